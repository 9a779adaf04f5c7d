"""Plots and a Markdown table from ``bench_throughput.py`` JSON files.

    python scripts/plot_results.py bench.json sweep_accept.json --out-dir plots/

Writes, for whichever the points allow (a plot needs two or more x values):
``throughput_vs_batch.png`` (output tok/s per run, one line per run and output length),
``throughput_vs_output_len.png`` (one line per run and batch), ``speedup_vs_accept.png``
(speedup over plain decoding of the same shape against the forced number of accepted drafts:
where the lines cross 1.0 is the break-even acceptance), and ``table.md`` with every point.
Older result files (one shape, a ``runs`` dict) are read too.

``--logs bench.log.gz ...`` (the output of a ``bench_throughput.py --log-level info`` run) adds
``speedup_vs_context.png``: SGLang's per-interval decode lines give tok/s against the mean
context per running request, so one long run shows where speculation starts to pay off;
each run is divided by the plain run of the same log and batch at the same context. Only
meaningful where the whole batch runs at once (the pool holds it: no admission limit or
retraction tail, whose intervals mix batch sizes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_throughput import add_speedups  # noqa: E402
from readme_table import CONFIGS  # noqa: E402


def load_points(paths: list[Path]) -> list[dict]:
    points: list[dict] = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "points" in report:
            new = [dict(p) for p in report["points"]]
        else:  # one shape per file, runs keyed by name
            new = [{"run": name, "batch": report["batch"], "input_len": report["input_len"],
                    "output_len": report["output_len"], **run} for name, run in report["runs"].items()]
        for p in new:
            p["source"] = Path(path).name
            p["shape"] = report.get("shape", "qwen3-8b")
            if p["run"] == "plain":
                p["forced_accept"] = None
        points.extend(new)
    add_speedups(points)
    return points


_DECODE_LINE = re.compile(r"Decode batch, #running-req: (\d+), #token: (\d+),.*gen throughput \(token/s\): ([\d.]+)")
_RESULT_LINE = re.compile(r"^([\w.-]+) (\{\"batch\".*\})\s*$")


def load_log_curves(path: Path) -> list[dict]:
    """Per-interval (mean context per running request, tok/s) of each point of a bench log.

    The decode lines of a point are those printed before its result line (``<run> {json}``)."""
    curves: list[dict] = []
    pending: list[tuple[float, float]] = []
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        for line in f:
            if m := _DECODE_LINE.search(line):
                running, tokens, tok_s = int(m[1]), int(m[2]), float(m[3])
                if running:
                    pending.append((tokens / running, tok_s))
            elif m := _RESULT_LINE.match(line):
                info = json.loads(m[2])
                curves.append({"run": m[1], "batch": info["batch"], "forced_accept": info.get("forced_accept"),
                               "source": Path(path).name, "points": pending})
                pending = []
    return curves


def context_speedups(curves: list[dict]) -> dict[tuple, list[tuple]]:
    """Speedup over plain (same log and batch) at each decode interval's context, by linear
    interpolation of plain's tok/s; contexts outside plain's range are dropped."""
    import numpy as np

    plain = {(c["source"], c["batch"]): sorted(c["points"]) for c in curves if c["run"] == "plain" and c["points"]}
    lines: dict[tuple, list[tuple]] = {}
    for c in curves:
        base = plain.get((c["source"], c["batch"]))
        if c["run"] == "plain" or not base:
            continue
        xs, ys = [x for x, _ in base], [y for _, y in base]
        pts = [(x, y / float(np.interp(x, xs, ys))) for x, y in sorted(c["points"]) if xs[0] <= x <= xs[-1]]
        if len(pts) >= 2:
            lines[(c["run"], c["forced_accept"], c["batch"], c["source"])] = pts
    return lines


def _label(run: str, forced: float | None) -> str:
    return run if forced is None else f"{run} (accept {forced:g})"


def _lines(points: list[dict], x: str, group: tuple[str, ...], y: str) -> dict[tuple, list[tuple]]:
    lines: dict[tuple, list[tuple]] = defaultdict(list)
    for p in points:
        if p.get(y) is not None:
            lines[tuple(p.get(g) for g in group)].append((p[x], p[y]))
    return {k: sorted(v) for k, v in lines.items() if len({xv for xv, _ in v}) >= 2}


def _plot(lines: dict[tuple, list[tuple]], label, xlabel: str, ylabel: str, title: str,
          path: Path, hline: float | None = None) -> bool:
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = lambda kv: tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in kv[0])  # noqa: E731
    for key, xy in sorted(lines.items(), key=order):
        ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=label(key))
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def table(points: list[dict]) -> str:
    rows = ["| shape | run | configuration | batch | input | output | forced accept | output tok/s | vs plain "
            "(same run) | mean accepted | p50 latency (s) | source |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    key = lambda p: (p["shape"], p["batch"], p["input_len"], p["output_len"], p["run"], p.get("forced_accept") or 0)  # noqa: E731
    for p in sorted(points, key=key):
        speed = f"{p['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in p else ""
        acc = f"{p['mean_accept_length']:.2f}" if p.get("mean_accept_length") is not None else ""
        forced = "" if p.get("forced_accept") is None else f"{p['forced_accept']:g}"
        rows.append(f"| {p['shape']} | {p['run']} | {CONFIGS.get(p['run'], '')} | {p['batch']} | {p['input_len']} | {p['output_len']} | {forced} | "
                    f"{p['output_tok_per_s']:.0f} | {speed} | {acc} | {p.get('latency_p50_s', 0):.1f} | {p['source']} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out-dir", type=Path, required=True)
    ap.add_argument("--logs", nargs="*", type=Path, default=[],
                    help="bench_throughput.py --log-level info logs (.log or .log.gz) for speedup_vs_context.png")
    args = ap.parse_args()
    points = load_points(args.results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "table.md").write_text(table(points))
    written = ["table.md"]
    runs = lambda k: f"{k[3]} {_label(k[0], k[1])}"  # noqa: E731
    if _plot(_lines(points, "batch", ("run", "forced_accept", "output_len", "shape"), "output_tok_per_s"),
             lambda k: f"{runs(k)}, out {k[2]}", "batch size", "output tokens / s",
             "Throughput vs batch size", args.out_dir / "throughput_vs_batch.png"):
        written.append("throughput_vs_batch.png")
    if _plot(_lines(points, "output_len", ("run", "forced_accept", "batch", "shape"), "output_tok_per_s"),
             lambda k: f"{runs(k)}, B {k[2]}", "output length (tokens)", "output tokens / s",
             "Throughput vs output length", args.out_dir / "throughput_vs_output_len.png"):
        written.append("throughput_vs_output_len.png")
    spec = [dict(p, accepted_drafts=p["forced_accept"] - 1) for p in points
            if p.get("forced_accept") is not None and "speedup_vs_plain" in p]
    if _plot(_lines(spec, "accepted_drafts", ("run", "batch", "output_len", "shape"), "speedup_vs_plain"),
             lambda k: f"{k[3]} {k[0]}, B {k[1]}, out {k[2]}", "forced accepted drafts per cycle",
             "speedup over plain decoding", "Break-even acceptance", args.out_dir / "speedup_vs_accept.png",
             hline=1.0):
        written.append("speedup_vs_accept.png")
    curves = [c for path in args.logs for c in load_log_curves(path)]
    if _plot(context_speedups(curves), lambda k: f"{_label(k[0], k[1])}, B {k[2]} ({k[3]})",
             "mean context per running request (tokens)", "speedup over plain decoding",
             "Speedup vs context (per decode-log interval)", args.out_dir / "speedup_vs_context.png", hline=1.0):
        written.append("speedup_vs_context.png")
    print("wrote", ", ".join(str(args.out_dir / w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
