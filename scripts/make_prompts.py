"""Make the reasoning prompt set from reasoning-gym, and measure the few-shot prompts it yields.

generate: seeded GSM8K-style word problems (reasoning-gym `gsm_symbolic`, with their worked
  chain-of-thought solutions) and code-reasoning tasks (`codeio`: predict a Python function's
  output or input; the dataset gives the answer but no worked solution), one JSON per line:
  id, task, question, answer, solution (null when the dataset has none).
measure: token counts of `few_shot_prompt` (sparsespec_sglang.testing.prompts) for every GSM
  question at several targets, with each real model's tokenizer (builds the model if needed).

    python scripts/make_prompts.py generate
    python scripts/make_prompts.py measure --model smollm2-135m qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import statistics
import sys
from pathlib import Path

from tqdm.auto import tqdm

from sparsespec_sglang.testing import provenance

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "benchmarks" / "prompts"


def _gsm(n: int, seed: int) -> list[dict]:
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", seed=seed, size=n)
    rows = []
    for i, item in enumerate(tqdm(data, total=n, desc="gsm_symbolic")):
        rows.append({
            "id": f"gsm_symbolic-{i:03d}",
            "task": "gsm_symbolic",
            "question": item["question"],
            "answer": str(item["answer"]),
            "solution": item["metadata"]["answer_cot"],
        })
    return rows


def _codeio(n: int, seed: int) -> list[dict]:
    import reasoning_gym

    # The dataset executes its own reference snippets to make input/output pairs; a snippet that
    # fails yields empty data (and prints the error), so draw extra items and keep the good ones.
    data = reasoning_gym.create_dataset("codeio", seed=seed, size=6 * n)
    rows = []
    bar = tqdm(total=n, desc="codeio")
    for i in range(len(data)):
        with contextlib.redirect_stdout(io.StringIO()):
            item, again = data[i], data[i]
        meta = item["metadata"]
        if not meta["input_data"] or meta["output_data"] in ({}, None):
            continue
        # Snippets that draw from a global (unseeded) random source give a different answer on
        # every run; keep only items whose answer is reproducible.
        if "random" in item["question"].split("Tip: Here is a reference code snippet")[-1] or item != again:
            continue
        rows.append({
            "id": f"codeio-{len(rows):03d}",
            "task": "codeio",
            "question": item["question"].strip(),
            "answer": item["answer"],
            "solution": None,
        })
        bar.update(1)
        if len(rows) == n:
            break
    bar.close()
    if len(rows) < n:
        raise SystemExit(f"error: only {len(rows)} of {n} codeio items generated cleanly")
    return rows


def generate(args: argparse.Namespace) -> None:
    import reasoning_gym

    rows = _gsm(args.gsm, args.seed) + _codeio(args.code, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    meta = {
        "command": "python scripts/make_prompts.py " + " ".join(sys.argv[1:]),
        "reasoning_gym": importlib.metadata.version("reasoning-gym"),
        "counts": {"gsm_symbolic": args.gsm, "codeio": args.code},
        "seed": args.seed,
    }
    print(json.dumps(meta))
    print(f"wrote {len(rows)} prompts to {args.out}", file=sys.stderr)


def measure(args: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing.prompts import count_tokens, few_shot_prompt, load_prompts
    from sparsespec_sglang.testing.real_models import ensure_model

    records = load_prompts(args.prompts)
    questions = [r for r in records if r["task"] == "gsm_symbolic"]
    result = {
        "command": "python scripts/make_prompts.py " + " ".join(sys.argv[1:]),
        "commit": provenance.commit(),
        "prompt_file": str(Path(args.prompts).relative_to(ROOT)) if args.prompts else None,
        "questions": len(questions),
        "models": {},
    }
    for name in args.model:
        tokenizer = AutoTokenizer.from_pretrained(ensure_model(name))
        per_target = {}
        for target in args.targets:
            lengths, shots = [], []
            for q in tqdm(questions, desc=f"{name} target {target}"):
                prompt = few_shot_prompt(tokenizer, None, q["question"], target, examples=records)
                lengths.append(count_tokens(tokenizer, prompt))
                shots.append(_shots(prompt, records, q))
            per_target[str(target)] = {
                "tokens_min": min(lengths), "tokens_mean": round(statistics.mean(lengths), 1),
                "tokens_max": max(lengths), "shots_min": min(shots), "shots_max": max(shots),
            }
        result["models"][name] = per_target
    args.result.parent.mkdir(parents=True, exist_ok=True)
    args.result.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["models"], indent=2))


def _shots(prompt: str, records: list[dict], question: dict) -> int:
    """How many worked solutions the prompt contains."""
    return sum(1 for r in records if r.get("solution") and r is not question and r["solution"] in prompt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="write the prompt file")
    g.add_argument("--seed", type=int, default=17)
    g.add_argument("--gsm", type=int, default=40, help="number of gsm_symbolic problems")
    g.add_argument("--code", type=int, default=10, help="number of codeio tasks")
    g.add_argument("--out", type=Path, default=OUT_DIR / "reasoning_prompts.jsonl")
    m = sub.add_parser("measure", help="few-shot prompt lengths per tokenizer")
    m.add_argument("--model", nargs="+", default=["smollm2-135m", "qwen2.5-coder-0.5b"])
    m.add_argument("--targets", type=int, nargs="+", default=[2500, 4000, 6000])
    m.add_argument("--prompts", type=Path, default=OUT_DIR / "reasoning_prompts.jsonl")
    m.add_argument("--result", type=Path, default=OUT_DIR / "few_shot_lengths.json")
    args = parser.parse_args()
    generate(args) if args.cmd == "generate" else measure(args)


if __name__ == "__main__":
    main()
