#!/usr/bin/env python
"""The draft-selection study: which selection policy accepts most, per prompt and paired.

Reads `scripts/acceptance.py` result files (one per setting: a model, a task, a prompt shape and
an output length), and for each file and selection floor (min-selected) reports

* every policy's pooled mean accepted drafts per cycle, the mean and spread of its per-prompt
  means, and the same split into looping and non-looping prompts (a prompt loops when its plain
  output's share of repeated 4-grams, `plain_repeated_4gram_share`, is at least --loop-threshold:
  a loop rewards copying from the recent window, so loops must not decide the default);
* a paired comparison of every policy against PillarAttn and against the window: on how many
  prompts it wins / ties / loses, the mean and standard deviation of the per-prompt difference,
  and the Wilcoxon signed-rank p-value (scipy) of that difference;
* accepted drafts by output position (pooled), for long outputs;
* for the `auto` selection, how many cycles used each recent fraction.

    python scripts/selection_study.py benchmarks/results/selection_smollm2-135m_*.json \
        --out benchmarks/results/selection_study_smollm2-135m.json --markdown selection.md

Greedy points only (every output must equal plain greedy decoding: a point that is not lossless
is reported and left out).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

REFERENCE_POLICIES = ("pillar", "window")


def _mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired(a: list[float], b: list[float], tie: float) -> dict[str, Any]:
    """a against b, prompt by prompt: wins (a > b + tie), ties, losses, the difference's mean and
    sd, and the Wilcoxon signed-rank p-value (None when every difference is zero or n < 2)."""
    from scipy.stats import wilcoxon

    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = _mean_sd(diffs)
    p = None
    if len(diffs) >= 2 and any(d != 0 for d in diffs):
        p = float(wilcoxon(diffs, zero_method="zsplit").pvalue)
    return {"n": len(diffs), "wins": sum(d > tie for d in diffs), "ties": sum(abs(d) <= tie for d in diffs),
            "losses": sum(d < -tie for d in diffs), "mean_diff": mean, "sd_diff": sd, "wilcoxon_p": p}


def analyse(report: dict[str, Any], loop_threshold: float, tie: float) -> dict[str, Any]:
    """One acceptance.py result file: per selection floor, every policy's summary and pairings."""
    rep = report.get("plain_repeated_4gram_share")
    if rep is None:
        raise ValueError("the file has no plain_repeated_4gram_share (written by scripts/acceptance.py since "
                         "it measures repetition); rerun it")
    looping = [r >= loop_threshold for r in rep]
    groups = {"all": [True] * len(rep), "non-looping": [not x for x in looping], "looping": looping}
    skipped = [r["label"] for r in report["results"] if r.get("temperature", 0) > 0 or r.get("lossless") is False]
    floors: dict[int, dict[str, dict]] = {}
    for r in report["results"]:
        if r["label"] in skipped:
            continue
        floors.setdefault(r["min_selected"], {})[r["policy"]] = r
    out: dict[str, Any] = {"prompts": report["prompts"], "repeated_4gram_share": rep, "looping": looping,
                           "skipped_points": skipped, "floors": {}}
    for floor, by_policy in sorted(floors.items()):
        policies: dict[str, Any] = {}
        for name, r in by_policy.items():
            per = r["mean_accepted_per_prompt"]
            entry: dict[str, Any] = {"pooled_mean_accepted": r["mean_accepted"], "num_cycles": r["num_cycles"],
                                     "by_position": [(b["start"], b["mean_accepted"]) for b in r["by_position"]]}
            for g, mask in groups.items():
                xs = [x for x, m in zip(per, mask) if m and x is not None]
                mean, sd = _mean_sd(xs)
                entry[g] = {"n": len(xs), "mean_of_prompts": mean, "sd": sd}
            if "recent_fraction_counts" in r:  # auto: how often each recent share was chosen
                entry["recent_fraction_counts"] = r["recent_fraction_counts"]
            policies[name] = entry
        pairings: dict[str, Any] = {}
        for ref in REFERENCE_POLICIES:
            if ref not in by_policy:
                continue
            for name, r in by_policy.items():
                if name == ref:
                    continue
                for g, mask in groups.items():
                    ok = [i for i, m in enumerate(mask) if m and r["mean_accepted_per_prompt"][i] is not None
                          and by_policy[ref]["mean_accepted_per_prompt"][i] is not None]
                    a = [r["mean_accepted_per_prompt"][i] for i in ok]
                    b = [by_policy[ref]["mean_accepted_per_prompt"][i] for i in ok]
                    pairings[f"{name} vs {ref} ({g})"] = paired(a, b, tie)
        out["floors"][str(floor)] = {"policies": policies, "paired": pairings}
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(name: str, report: dict[str, Any], result: dict[str, Any]) -> str:
    src = report.get("prompt_source", {})
    lens = report.get("prompt_lens", [])
    n_loop = sum(result["looping"])
    lines = [f"### {name}", "",
             f"{report.get('model_type')} ({report.get('dtype')}, {report.get('device')}), "
             f"{report['num_prompts']} prompts (task {src.get('task') or 'all'}, "
             f"few-shot {src.get('few_shot_tokens') or 'none'}; prompt lengths {min(lens)}-{max(lens)}), "
             f"{report['max_new_tokens']} new tokens; {n_loop} of {len(result['looping'])} plain outputs loop "
             f"(repeated 4-gram share >= threshold).", ""]
    if result["skipped_points"]:
        lines += [f"Left out (sampled or not lossless): {', '.join(result['skipped_points'])}.", ""]
    for floor, f in result["floors"].items():
        lines += [f"min-selected {floor}:", "",
                  "| policy | pooled mean accepted | per prompt: mean (sd) | non-looping | looping |",
                  "|---|---|---|---|---|"]
        for name, e in f["policies"].items():
            lines.append(f"| {name} | {_fmt(e['pooled_mean_accepted'])} | {_fmt(e['all']['mean_of_prompts'])} "
                         f"({_fmt(e['all']['sd'])}) | {_fmt(e['non-looping']['mean_of_prompts'])} "
                         f"(n {e['non-looping']['n']}) | {_fmt(e['looping']['mean_of_prompts'])} "
                         f"(n {e['looping']['n']}) |")
        for name, e in f["policies"].items():
            if "recent_fraction_counts" in e:
                counts = e["recent_fraction_counts"]
                n = sum(counts.values())
                lines += ["", f"{name}: recent fraction chosen per cycle (of {n}): "
                          + ", ".join(f"F {k} {v} ({100 * v / n:.0f}%)" for k, v in counts.items())]
        lines += ["", "| paired (per prompt) | wins / ties / losses | mean diff (sd) | Wilcoxon p |", "|---|---|---|---|"]
        for key, p in f["paired"].items():
            lines.append(f"| {key} | {p['wins']} / {p['ties']} / {p['losses']} | {_fmt(p['mean_diff'])} "
                         f"({_fmt(p['sd_diff'])}) | {_fmt(p['wilcoxon_p'], 3)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="scripts/acceptance.py result files")
    ap.add_argument("--loop-threshold", type=float, default=0.5,
                    help="a plain output with at least this share of repeated 4-grams loops (default 0.5)")
    ap.add_argument("--tie", type=float, default=0.05,
                    help="per-prompt differences within this many accepted drafts count as ties (default 0.05)")
    ap.add_argument("--out", help="write the analysis as JSON")
    ap.add_argument("--markdown", help="write the tables as Markdown (they are printed either way)")
    args = ap.parse_args(argv)
    if not 0 < args.loop_threshold <= 1:
        ap.error(f"--loop-threshold must be a number in (0, 1] (got {args.loop_threshold})")
    if args.tie < 0:
        ap.error(f"--tie must be a number >= 0 (got {args.tie})")
    analysis, parts = {}, []
    for f in args.files:
        path = Path(f)
        try:
            report = json.loads(path.read_text())
            result = analyse(report, args.loop_threshold, args.tie)
        except (OSError, ValueError, KeyError) as e:
            print(f"selection_study: {path}: {e}", file=sys.stderr)
            return 2
        analysis[path.name] = result
        parts.append(markdown(path.name, report, result))
    text = "\n".join(parts)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps({"loop_threshold": args.loop_threshold, "tie": args.tie,
                                              "files": analysis}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
