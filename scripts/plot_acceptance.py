#!/usr/bin/env python
"""Plots and a markdown table from scripts/acceptance.py JSON results.

    python scripts/plot_acceptance.py benchmarks/results/acceptance_smollm2-135m_*_cpu.json --name smollm2-135m

Writes <plots>/acceptance_<name>_points.png (mean accepted per study point, as a fraction of k so
different k compare) and <plots>/acceptance_<name>_position.png (mean accepted vs output position
per point), prints their paths and the table (one row per point; a label seen in several files
keeps its first occurrence). <plots> is a folder under the system's temporary directory unless
--plots says otherwise (the project's own figures are regenerated with --plots docs/plots).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

# Outside any clone by default: a user's plots do not belong in the repository.
DEFAULT_PLOTS = Path(tempfile.gettempdir()) / "sparsespec_plots"


def load_rows(paths: list[Path]) -> list[dict]:
    rows, seen = [], set()
    for path in paths:
        for r in json.loads(path.read_text())["results"]:
            if r["label"] not in seen:
                seen.add(r["label"])
                rows.append(dict(r, source=path.name))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| point | k | policy | mean accepted | of k | tokens/cycle | cycles | mean K | wall s | lossless |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['k']} | {r['policy']} | {r['mean_accepted']:.2f} | "
                     f"{r['acceptance_rate']:.2f} | {r['mean_tokens_per_cycle']:.2f} | {r['num_cycles']} | "
                     f"{r.get('mean_selected', float('nan')):.0f} | {r['wall_s']:.0f} | {r.get('lossless', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path, help="JSON files written by scripts/acceptance.py --out")
    ap.add_argument("--name", required=True, help="model name used in the PNG file names (required)")
    ap.add_argument("--plots", type=Path, default=DEFAULT_PLOTS,
                    help=f"folder the PNG files are written to (default: {DEFAULT_PLOTS})")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(args.results)
    args.plots.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(9, 4))
    colors = ["tab:green" if r["policy"] == "pillar" else "tab:gray" for r in rows]
    ax.bar(range(len(rows)), [r["acceptance_rate"] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean accepted / k")
    ax.set_ylim(0, 1)
    ax.set_title(f"{args.name}: acceptance per study point (green: PillarAttn selection)")
    fig.tight_layout()
    fig.savefig(args.plots / f"acceptance_{args.name}_points.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4))
    lines = [r for r in rows if r["k"] == 8 and r["temperature"] <= 0]
    for i, r in enumerate(lines):
        xs = [(b["start"] + b["end"]) / 2 for b in r["by_position"]]
        ax.plot(xs, [b["mean_accepted"] for b in r["by_position"]], marker="o", label=r["label"],
                color=plt.cm.tab20(i % 20), linestyle="-" if r["policy"] == "pillar" else "--")
    ax.set_xlabel("output position (tokens)")
    ax.set_ylabel("mean accepted of 8")
    ax.set_title(f"{args.name}: accepted vs output position (k=8, greedy)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.plots / f"acceptance_{args.name}_position.png", dpi=120)
    for kind in ("points", "position"):
        print(f"wrote {args.plots / f'acceptance_{args.name}_{kind}.png'}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
