#!/usr/bin/env python
"""Acceptance study for SparseSpec (PillarAttn) with the PyTorch reference.

Runs `sparsespec_sglang.testing.reference.sparsespec_generate` over a set of prompts for every
(k, sparsity) pair and writes one JSON file with, per config: mean drafts accepted per
cycle, mean tokens per cycle (accepted + bonus), the acceptance histogram over 0..k,
and tokens/cycle bucketed by position in the output.

    python scripts/acceptance.py --model-dir DIR --num-prompts 8 --prompt-len 256 \
        --max-new-tokens 1024 --k 4,8 --sparsity 0.02,0.05,0.1 --out results.json

Prompts: --prompts FILE (.txt: one prompt per line; .json: list of strings; .jsonl: one
string or {"prompt": ...} per line), tokenized with the model's tokenizer (--chat applies
its chat template), or --num-prompts N --prompt-len L random token prompts (seeded).
--make-tiny creates a tiny random Qwen3 model in --model-dir if it does not exist.
--check-lossless (greedy only) also runs plain greedy decoding and records whether every
output is identical.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _norms(s: str) -> list[str]:
    norms = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in norms if n not in ("exact", "draft")]
    if bad or not norms:
        raise argparse.ArgumentTypeError(f"allowed: exact, draft (got {s!r})")
    return norms


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--make-tiny", action="store_true", help="create a tiny random model if --model-dir is missing")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompt file (.txt / .json / .jsonl)")
    src.add_argument("--num-prompts", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to file prompts")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--k", type=_ints, default=[8], help="comma list of draft lengths")
    ap.add_argument("--sparsity", type=_floats, default=[0.05], help="comma list of sparsity ratios s")
    ap.add_argument("--min-selected", type=int, default=64)
    ap.add_argument("--max-selected", type=int, default=2048)
    ap.add_argument("--num-sink", type=int, default=4)
    ap.add_argument("--aggregation", choices=["sum", "max"], default="sum")
    ap.add_argument("--score-norm", type=_norms, default=["exact"],
                    help="comma list of verify-score normalisers to compare: exact, draft")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--bucket-size", type=int, default=None,
                    help="output-position bucket width (default: ceil(max_new_tokens / 8))")
    ap.add_argument("--check-lossless", action="store_true",
                    help="(greedy) also run plain greedy decoding and compare token ids")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.prompts is None and args.num_prompts is None:
        args.num_prompts = 4
    if args.bucket_size is None:
        args.bucket_size = max(1, math.ceil(args.max_new_tokens / 8))
    return args


def load_prompts(args, tokenizer, vocab_size: int, special_ids: set[int]) -> list[list[int]]:
    import torch

    if args.prompts:
        path = Path(args.prompts)
        text = path.read_text()
        if path.suffix == ".json":
            items = json.loads(text)
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
        prompts = []
        for it in items:
            s = it["prompt"] if isinstance(it, dict) else str(it)
            if tokenizer is None:
                raise SystemExit("--prompts needs a tokenizer in --model-dir")
            if args.chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                                    tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(s)["input_ids"]
            prompts.append([int(i) for i in ids])
        return prompts
    g = torch.Generator().manual_seed(args.seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special_ids])
    return [allowed[torch.randint(len(allowed), (args.prompt_len,), generator=g)].tolist()
            for _ in range(args.num_prompts)]


def summarize(outputs, k: int, bucket_size: int) -> dict:
    cycles = [c for o in outputs for c in o.cycles]
    n = len(cycles)
    hist = [0] * (k + 1)
    for c in cycles:
        hist[c.accepted] += 1
    buckets: dict[int, list] = {}
    for c in cycles:
        buckets.setdefault(c.output_offset // bucket_size, []).append(c)
    by_pos = []
    for b in sorted(buckets):
        cs = buckets[b]
        acc = sum(c.accepted for c in cs) / len(cs)
        by_pos.append({"start": b * bucket_size, "end": (b + 1) * bucket_size, "num_cycles": len(cs),
                       "mean_accepted": acc, "mean_tokens_per_cycle": acc + 1})
    mean_acc = sum(c.accepted for c in cycles) / n if n else 0.0
    gen = sum(len(o.tokens) for o in outputs)
    return {
        "num_cycles": n,
        "generated_tokens": gen,
        "mean_accepted": mean_acc,
        "mean_tokens_per_cycle": mean_acc + 1 if n else 0.0,
        "acceptance_rate": mean_acc / k if n else 0.0,
        # Output tokens per verify pass over the whole run (includes the prefill token and
        # the truncated final cycle of each request).
        "tokens_per_verify": gen / n if n else 0.0,
        "acceptance_histogram": hist,
        "by_position": by_pos,
        "finish_reasons": [o.finish_reason for o in outputs],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    import sparsespec_sglang
    from sparsespec_sglang.testing import reference as R

    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        if not args.make_tiny:
            raise SystemExit(f"--model-dir {model_dir} does not exist (pass --make-tiny to create a tiny model)")
        from sparsespec_sglang.testing.model_dirs import make_model_dir

        make_model_dir(model_dir, "tiny", seed=args.seed)

    model = R.load_model(model_dir, device=args.device, dtype=args.dtype)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        special = set(tokenizer.all_special_ids)
        vocab = min(len(tokenizer), model.config.vocab_size)
    except Exception:  # no tokenizer: random prompts only
        tokenizer, special, vocab = None, set(), model.config.vocab_size
    special |= R.eos_token_ids(model, None)
    prompts = load_prompts(args, tokenizer, vocab, special)

    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, ignore_eos=args.ignore_eos)
    plain = None
    if args.check_lossless and args.temperature <= 0:
        plain = [R.plain_generate(model, p, args.max_new_tokens, **sampling).tokens for p in prompts]

    results = []
    for k, s, norm in itertools.product(args.k, args.sparsity, args.score_norm):
        cfg = R.SparseSpecConfig(num_draft_steps=k, sparsity=s, min_selected=args.min_selected,
                                 max_selected=args.max_selected, num_sink_tokens=args.num_sink,
                                 aggregation=args.aggregation, score_norm=norm)
        gen = torch.Generator().manual_seed(args.seed)
        t0 = time.perf_counter()
        outs = [R.sparsespec_generate(model, p, args.max_new_tokens, cfg, generator=gen, **sampling)
                for p in prompts]
        entry = {"k": k, "sparsity": s, "score_norm": norm, "wall_s": time.perf_counter() - t0}
        entry.update(summarize(outs, k, args.bucket_size))
        if plain is not None:
            entry["lossless"] = all(o.tokens == t for o, t in zip(outs, plain))
        results.append(entry)
        print(f"k={k} s={s} score-norm={norm}: mean accepted {entry['mean_accepted']:.3f}/{k}, "
              f"tokens/cycle {entry['mean_tokens_per_cycle']:.3f}, cycles {entry['num_cycles']}"
              + (f", lossless={entry['lossless']}" if "lossless" in entry else ""), flush=True)

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": sys.argv if argv is None else ["scripts/acceptance.py", *argv],
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sparsespec_sglang": getattr(sparsespec_sglang, "__version__", None),
        },
        "model_dir": str(model_dir),
        "model_type": model.config.model_type,
        "device": args.device,
        "dtype": args.dtype,
        "num_prompts": len(prompts),
        "prompt_lens": [len(p) for p in prompts],
        "max_new_tokens": args.max_new_tokens,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                     "ignore_eos": args.ignore_eos, "seed": args.seed},
        "selection": {"min_selected": args.min_selected, "max_selected": args.max_selected,
                      "num_sink_tokens": args.num_sink, "aggregation": args.aggregation,
                      "first_cycle": "window"},
        "bucket_size": args.bucket_size,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
