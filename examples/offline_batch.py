"""Offline batch generation with sglang.Engine and SPARSESPEC (GPU host).

    python examples/offline_batch.py --model-path DIR [--num-prompts 8] [--max-new-tokens 256]

Without --model-path it builds a small random-weight Qwen3 model to run against.
"""

import argparse
import tempfile
from pathlib import Path

import sglang as sgl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    args = ap.parse_args()
    model_path = args.model_path
    if model_path is None:
        from sparsespec_sglang.testing.model_dirs import make_model_dir

        model_path = str(make_model_dir(Path(tempfile.mkdtemp()) / "small", "small"))

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


if __name__ == "__main__":
    main()
