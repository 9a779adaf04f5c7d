#!/usr/bin/env python
"""Acceptance study for SparseSpec (PillarAttn) with the PyTorch reference.

Runs `sparsespec_sglang.testing.reference.sparsespec_generate` on a set of prompts for every
study point and writes one JSON file with, per point: mean drafts accepted per cycle, mean
tokens per cycle (accepted + bonus), the acceptance histogram over 0..k, acceptance bucketed by
output position, wall time, and the prompts used.

Points. Without --points, the product of --k x --sparsity x --score-norm x --policy around the
other flags. With --points, a comma list of points, each "default" (the flags as given) or
overrides joined by '+', e.g. "k=4", "s=0.02+min_sel=128", "policy=hybrid:0.5":
    k, s (sparsity), min_sel, max_sel, sink, score_norm (exact|draft), aggregation (sum|max),
    temperature, policy (pillar|window|random[:SEED]|inverted|hybrid:F|auto)
--points ofat expands to the one-factor-at-a-time study around the defaults (OFAT_POINTS) and
--points baselines to the selection-policy baselines (BASELINE_POINTS).

    python scripts/acceptance.py --model-dir DIR --prompt-set benchmarks/prompts/reasoning_prompts.jsonl \
        --num-prompts 4 --few-shot-tokens 3000 --max-new-tokens 256 --points ofat --out results.json

Prompts: --prompt-set FILE (the project's reasoning prompt set: chat template, or few-shot
prompts of about --few-shot-tokens tokens), --prompts FILE (.txt: one prompt per line; .json:
list of strings; .jsonl: one string or {"prompt": ...} per line; --chat applies the chat
template), or --num-prompts N --prompt-len L random token prompts (seeded).
--make-tiny creates a tiny random Qwen3 model in --model-dir if it does not exist.
Greedy points: plain greedy decoding runs once per prompt; its output is the guess that lets
the reference draft a whole cycle in one forward, and every point records whether its output
equals it token for token ("lossless"). Each prompt's plain output also gets its share of
repeated 4-grams (`plain_repeated_4gram_share`): small models fall into loops on long outputs,
and a loop rewards copying from the recent window, so `scripts/selection_study.py` reports
looping and non-looping prompts apart.

--workers N runs N processes, each with its own copy of the model, one prompt (plain decode and
every point) at a time: the reference decodes one request at a time and is launch-bound on a GPU,
so a 0.1-0.5B model leaves the GPU mostly idle to one process. Sampled points draw from a
generator seeded with --seed plus the prompt's index, so results do not depend on N.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# One-factor-at-a-time study around the default (k=8, s=0.05, exact scores, sum, greedy).
BASELINE_POINTS = ["policy=window", "policy=random", "policy=inverted", "policy=hybrid:0.25",
                   "policy=hybrid:0.5", "policy=hybrid:0.75"]
OFAT_POINTS = ["default", "k=4", "k=16", "s=0.02", "s=0.1", "min_sel=16", "min_sel=128", "min_sel=192",
               "score_norm=draft", "aggregation=max", "temperature=0.6", *BASELINE_POINTS]
# The selection study: PillarAttn, the window and the window/score hybrids at two selection floors.
SELECTION_POINTS = [f"min_sel={m}+policy={p}" for m in (64, 128)
                    for p in ("pillar", "window", "hybrid:0.25", "hybrid:0.5", "hybrid:0.75")]
POINT_SETS = {"ofat": OFAT_POINTS, "baselines": ["default", *BASELINE_POINTS], "selection": SELECTION_POINTS}
POINT_KEYS = {"k": ("k", int), "s": ("sparsity", float), "min_sel": ("min_selected", int),
              "max_sel": ("max_selected", int), "sink": ("num_sink", int), "score_norm": ("score_norm", str),
              "aggregation": ("aggregation", str), "temperature": ("temperature", float),
              "policy": ("policy", str)}


@dataclass(frozen=True)
class Point:
    """One study point: a full SparseSpec configuration plus sampling temperature and policy."""

    label: str
    k: int
    sparsity: float
    min_selected: int
    max_selected: int
    num_sink: int
    score_norm: str
    aggregation: str
    temperature: float
    policy: str

    def config(self, R):
        return R.SparseSpecConfig(num_draft_steps=self.k, sparsity=self.sparsity, min_selected=self.min_selected,
                                  max_selected=self.max_selected, num_sink_tokens=self.num_sink,
                                  aggregation=self.aggregation, score_norm=self.score_norm)


def _list(conv):
    def parse(s: str):
        try:
            return [conv(x.strip()) for x in s.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of {conv.__name__} values (got {s!r})")
    return parse


def _norms(s: str) -> list[str]:
    norms = [x.strip() for x in s.split(",") if x.strip()]
    bad = [n for n in norms if n not in ("exact", "draft")]
    if bad or not norms:
        raise argparse.ArgumentTypeError(f"allowed: exact, draft (got {s!r})")
    return norms


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--make-tiny", action="store_true", help="create a tiny random model if --model-dir is missing")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="prompt file (.txt / .json / .jsonl)")
    src.add_argument("--prompt-set", help="the project's prompt set (.jsonl, sparsespec_sglang.testing.prompts)")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="random prompts to make, or the first N of --prompt-set / --prompts")
    ap.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    ap.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to --prompts")
    ap.add_argument("--task", default=None, help="--prompt-set: only records of this task (e.g. gsm_symbolic)")
    ap.add_argument("--prompt-start", type=int, default=0,
                    help="--prompt-set: skip this many records (few-shot examples come from the start)")
    ap.add_argument("--few-shot-tokens", type=int, default=0,
                    help="--prompt-set: few-shot prompts of about this many tokens (0: one chat turn)")
    ap.add_argument("--max-new-tokens", type=int, required=True)
    ap.add_argument("--points", default=None,
                    help="comma list of study points (see above), or a named set: " + ", ".join(POINT_SETS))
    ap.add_argument("--k", type=_list(int), default=[8], help="comma list of draft lengths")
    ap.add_argument("--sparsity", type=_list(float), default=[0.05], help="comma list of sparsity ratios s")
    ap.add_argument("--min-selected", type=int, default=64)
    ap.add_argument("--max-selected", type=int, default=2048)
    ap.add_argument("--num-sink", type=int, default=4)
    ap.add_argument("--aggregation", choices=["sum", "max"], default="sum")
    ap.add_argument("--score-norm", type=_norms, default=["exact"],
                    help="comma list of verify-score normalisers to compare: exact, draft")
    ap.add_argument("--policy", type=_list(str), default=["pillar"],
                    help="comma list of selection policies: pillar, window, random[:SEED], inverted, hybrid:F, auto")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=-1)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--bucket-size", type=int, default=None,
                    help="output-position bucket width (default: ceil(max_new_tokens / 8))")
    ap.add_argument("--check-lossless", action="store_true",
                    help="(kept for old command lines: greedy points always record 'lossless')")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1, the default, is fastest on a shared CPU; 0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1,
                    help="processes, each with its own model copy, working on one prompt at a time (default 1)")
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what was cut to fit)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.prompts is None and args.prompt_set is None and args.num_prompts is None:
        args.num_prompts = 4
    if args.few_shot_tokens and not args.prompt_set:
        ap.error("--few-shot-tokens needs --prompt-set")
    if args.workers < 1:
        ap.error(f"--workers must be an integer >= 1 (got {args.workers})")
    if args.bucket_size is None:
        args.bucket_size = max(1, math.ceil(args.max_new_tokens / 8))
    try:
        args.point_list = build_points(args)
    except ValueError as e:
        ap.error(str(e))
    return args


def build_points(args) -> list[Point]:
    """The study points from --points (or the product of the list flags)."""
    from sparsespec_sglang.testing.reference import DraftSelection

    base = dict(k=args.k[0], sparsity=args.sparsity[0], min_selected=args.min_selected,
                max_selected=args.max_selected, num_sink=args.num_sink, score_norm=args.score_norm[0],
                aggregation=args.aggregation, temperature=args.temperature, policy=args.policy[0])
    if args.points is None:
        specs = [(f"k={k}+s={s}+score_norm={n}+policy={p}", dict(base, k=k, sparsity=s, score_norm=n, policy=p))
                 for k in args.k for s in args.sparsity for n in args.score_norm for p in args.policy]
    else:
        labels = [x.strip() for x in args.points.split(",") if x.strip()]
        labels = [lab for x in labels for lab in POINT_SETS.get(x, [x])]
        specs = []
        for label in labels:
            values = dict(base)
            for item in ([] if label == "default" else label.split("+")):
                key, eq, val = item.partition("=")
                if not eq or key not in POINT_KEYS:
                    raise ValueError(f"--points: bad point {label!r}; use 'default' or key=value joined by '+' "
                                     f"with keys {', '.join(POINT_KEYS)}, or a set: {', '.join(POINT_SETS)}")
                name, conv = POINT_KEYS[key]
                try:
                    values[name] = conv(val)
                except ValueError:
                    kind = {int: "an integer", float: "a number"}.get(conv, "a value")
                    raise ValueError(f"--points: {key} needs {kind} (got {val!r} in {label!r})") from None
            specs.append((label, values))
    points = []
    for label, values in specs:
        values["policy"] = DraftSelection.parse(values["policy"]).label
        points.append(Point(label=label, **values))
    return points


def load_prompt_ids(args, tokenizer, vocab_size: int, special_ids: set[int]) -> tuple[list[list[int]], list[str]]:
    """Token ids of every prompt and a short name for each (its id in the prompt set, or index)."""
    import torch

    if args.prompt_set:
        from sparsespec_sglang.testing import prompts as P

        records = P.load_prompts(args.prompt_set)
        chosen = P.load_prompts(args.prompt_set, task=args.task)[args.prompt_start:][: args.num_prompts]
        texts = [P.few_shot_prompt(tokenizer, None, r["question"], args.few_shot_tokens, examples=records)
                 if args.few_shot_tokens else P.chat_prompt(tokenizer, r["question"]) for r in chosen]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [[int(i) for i in p] for p in ids], [str(r["id"]) for r in chosen]
    if args.prompts:
        path = Path(args.prompts)
        text = path.read_text()
        if path.suffix == ".json":
            items = json.loads(text)
        elif path.suffix == ".jsonl":
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            items = [line for line in text.splitlines() if line.strip()]
        items = items[: args.num_prompts]
        if tokenizer is None:
            raise SystemExit("--prompts needs a tokenizer in --model-dir")
        prompts = []
        for it in items:
            s = it["prompt"] if isinstance(it, dict) else str(it)
            if args.chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True,
                                                    tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
            else:
                ids = tokenizer(s)["input_ids"]
            prompts.append([int(i) for i in ids])
        return prompts, [str(i) for i in range(len(prompts))]
    g = torch.Generator().manual_seed(args.seed)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special_ids])
    prompts = [allowed[torch.randint(len(allowed), (args.prompt_len,), generator=g)].tolist()
               for _ in range(args.num_prompts)]
    return prompts, [f"random{i}" for i in range(len(prompts))]


def _fraction_counts(cycles) -> dict[str, int]:
    """How many cycles used each recent fraction (the `auto` selection's choices), by F."""
    counts: dict[float, int] = {}
    for c in cycles:
        if c.recent_fraction is not None:
            counts[c.recent_fraction] = counts.get(c.recent_fraction, 0) + 1
    return {f"{f:g}": counts[f] for f in sorted(counts)}


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
    per_prompt = [sum(c.accepted for c in o.cycles) / len(o.cycles) if o.cycles else None for o in outputs]
    fractions = {}
    if any(c.recent_fraction is not None for c in cycles):  # auto: the F each cycle's selection used
        fractions = {"recent_fraction_counts": _fraction_counts(cycles),
                     "recent_fraction_counts_per_prompt": [_fraction_counts(o.cycles) for o in outputs]}
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
        "mean_accepted_per_prompt": per_prompt,
        "mean_selected": sum(c.num_selected for c in cycles) / n if n else 0.0,
        "by_position": by_pos,
        "finish_reasons": [o.finish_reason for o in outputs],
        **fractions,
    }


def _commit() -> str | None:
    from sparsespec_sglang.testing import provenance

    return provenance.commit()


def _machine(device: str) -> dict:
    import torch

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def repeated_ngram_share(tokens: list[int], n: int = 4) -> float:
    """Share of the output's n-grams that already occurred earlier in it (0: no repeats; a loop
    of period p over most of the output tends to 1)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


@dataclass
class PromptRun:
    """One prompt's plain decode and its output at every point (cycles without tensors)."""

    plain: list[int]
    plain_s: float
    outputs: list
    walls: list[float]


def run_prompt(model, index: int, prompt: list[int], points: list[Point], args: argparse.Namespace) -> PromptRun:
    """Plain greedy decoding, then every point, on one prompt (its prefill computed once)."""
    import torch

    from sparsespec_sglang.testing import reference as R

    stop = dict(ignore_eos=args.ignore_eos)
    t0 = time.perf_counter()
    pre = R.prefill(model, prompt)
    plain = R.plain_generate(model, prompt, args.max_new_tokens, prefilled=pre, **stop).tokens
    plain_s = time.perf_counter() - t0
    outputs, walls = [], []
    for pt in points:
        gen = torch.Generator().manual_seed(args.seed + index)
        t0 = time.perf_counter()
        out = R.sparsespec_generate(model, prompt, args.max_new_tokens, pt.config(R), policy=pt.policy,
                                    target_tokens=plain if pt.temperature <= 0 else None, prefilled=pre,
                                    temperature=pt.temperature, top_k=args.top_k, top_p=args.top_p,
                                    generator=gen, **stop)
        walls.append(time.perf_counter() - t0)
        for c in out.cycles:  # tensors stay in the worker
            c.selection = c.scores = None
        outputs.append(out)
    return PromptRun(plain, plain_s, outputs, walls)


_worker_model: list = []  # the model of this worker process (set once by _init_worker)


def _init_worker(model_dir: str, device: str, dtype: str, threads: int) -> None:
    import torch

    from sparsespec_sglang.testing import reference as R

    torch.set_num_threads(max(threads, 1))
    _worker_model.append(R.load_model(model_dir, device=device, dtype=dtype))


def _worker_run(index: int, prompt: list[int], points: list[Point], args: argparse.Namespace) -> PromptRun:
    return run_prompt(_worker_model[0], index, prompt, points, args)


def _model_info(model_dir: Path):
    """The config and generation config a model directory declares (vocab size, EOS ids) without
    loading its weights: with --workers the weights load only in the workers."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return SimpleNamespace(config=config, generation_config=generation)


def run_all(args: argparse.Namespace, model_dir: Path, prompts: list[list[int]], points: list[Point]) -> list[PromptRun]:
    """Every prompt, in order: in this process, or spread over --workers processes."""
    from tqdm import tqdm

    bar = tqdm(total=len(prompts), desc="acceptance", unit="prompt", disable=args.no_progress, file=sys.stderr)
    if args.workers == 1:
        from sparsespec_sglang.testing import reference as R

        model = R.load_model(model_dir, device=args.device, dtype=args.dtype)
        runs = []
        for i, p in enumerate(prompts):
            runs.append(run_prompt(model, i, p, points, args))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(args.workers, len(prompts)),
                                 mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(str(model_dir), args.device, args.dtype, args.threads)) as pool:
            futures = [pool.submit(_worker_run, i, p, points, args) for i, p in enumerate(prompts)]
            for f in futures:
                f.add_done_callback(lambda _: bar.update())
            runs = [f.result() for f in futures]
    bar.close()
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    import sparsespec_sglang
    from sparsespec_sglang.testing import reference as R

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir)
    if not model_dir.exists():
        if not args.make_tiny:
            raise SystemExit(f"--model-dir {model_dir} does not exist (pass --make-tiny to create a tiny model)")
        from sparsespec_sglang.testing.model_dirs import make_model_dir

        make_model_dir(model_dir, "tiny", seed=args.seed)

    info = _model_info(model_dir)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        special = set(tokenizer.all_special_ids)
        vocab = min(len(tokenizer), info.config.vocab_size)
    except Exception:  # no tokenizer: random prompts only
        tokenizer, special, vocab = None, set(), info.config.vocab_size
    special |= R.eos_token_ids(info, None)
    prompts, prompt_names = load_prompt_ids(args, tokenizer, vocab, special)
    points = args.point_list

    t0 = time.perf_counter()
    runs = run_all(args, model_dir, prompts, points)
    total_s = time.perf_counter() - t0
    plain = [r.plain for r in runs]

    results = []
    for j, pt in enumerate(points):
        outs = [r.outputs[j] for r in runs]
        entry = {"label": pt.label, "k": pt.k, "sparsity": pt.sparsity, "min_selected": pt.min_selected,
                 "max_selected": pt.max_selected, "num_sink": pt.num_sink, "score_norm": pt.score_norm,
                 "aggregation": pt.aggregation, "temperature": pt.temperature, "policy": pt.policy,
                 "wall_s": sum(r.walls[j] for r in runs)}
        entry.update(summarize(outs, pt.k, args.bucket_size))
        if pt.temperature <= 0:
            entry["lossless"] = all(o.tokens == t for o, t in zip(outs, plain))
        results.append(entry)
        print(f"{pt.label}: mean accepted {entry['mean_accepted']:.3f}/{pt.k}, "
              f"tokens/cycle {entry['mean_tokens_per_cycle']:.3f}, cycles {entry['num_cycles']}, "
              f"{entry['wall_s']:.1f}s" + (f", lossless={entry['lossless']}" if "lossless" in entry else ""))

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "argv": sys.argv if argv is None else ["scripts/acceptance.py", *argv],
        "commit": _commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sparsespec_sglang": getattr(sparsespec_sglang, "__version__", None),
        },
        "machine": _machine(args.device),
        "note": args.note,
        "model_dir": str(model_dir),
        "model_type": info.config.model_type,
        "device": args.device,
        "dtype": args.dtype,
        "num_prompts": len(prompts),
        "prompts": prompt_names,
        "prompt_lens": [len(p) for p in prompts],
        "prompt_source": {"prompt_set": args.prompt_set, "task": args.task, "prompt_start": args.prompt_start, "prompts": args.prompts,
                          "few_shot_tokens": args.few_shot_tokens, "chat": args.chat},
        "max_new_tokens": args.max_new_tokens,
        "plain_tokens": [len(t) for t in plain],
        "plain_wall_s": sum(r.plain_s for r in runs),
        "plain_repeated_4gram_share": [repeated_ngram_share(t) for t in plain],
        "workers": args.workers,
        "total_wall_s": total_s,
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
