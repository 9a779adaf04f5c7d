"""The throughput tables of README.md and docs/results.md, recomputed from benchmarks/results/.

Every published speedup is one run divided by its baseline (plain SGLang unless stated) measured
in the *same process* (one ``bench_throughput.py`` command, same shape), never across files. The
README table holds the default configuration only (unified schedule, exact scores); every other
configuration goes to docs/results.md under "measured on a non-default configuration". Each table
sits between ``<!-- readme-table:NAME start -->`` and ``<!-- readme-table:NAME end -->``.

    python scripts/readme_table.py            # rewrite both tables from the JSON files
    python scripts/readme_table.py --check    # exit 1 if a table differs from the JSON files

To publish a new measurement, append an ``Entry`` to ``DEFAULT`` or ``NON_DEFAULT`` and run the
script. A ``DEFAULT`` entry must be a run of the default configuration (``DEFAULT_RUNS``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"default": ROOT / "README.md", "non-default": ROOT / "docs" / "results.md"}

# bench_throughput.py run names -> the configuration each one runs. Runs without "unified" are
# lockstep; in files written before the unified schedule existed, "sparsespec" was lockstep too.
CONFIGS = {
    "plain": "plain SGLang (Triton backend)",
    "plain-hicache": "plain SGLang + HiCache keeping retracted KV",
    "ngram": "SGLang NGRAM (k+1 = 9)",
    "sparsespec": "lockstep, exact scores",
    "sparsespec-draftnorm": "lockstep, draft scores",
    "sparsespec-draftnorm-hicache": "lockstep, draft scores, HiCache",
    "sparsespec-unified": "unified, exact scores (default)",
    "sparsespec-draftnorm-unified": "unified, draft scores",
    "sparsespec-draftnorm-unified-nodelay": "unified, draft scores, no delayed verification",
    "sparsespec-unified-adaptive": "unified, exact scores, adaptive speculation",
}
DEFAULT_RUNS = {"sparsespec-unified"}
# bench_saturated.py configurations (its files have a "mode"): there "sparsespec" is the default.
SATURATED_CONFIGS = {
    "plain": "plain SGLang (Triton backend)",
    "plain-flashinfer": "plain SGLang (FlashInfer backend)",
    "sparsespec": "unified, exact scores, HiCache (default)",
    "sparsespec-lockstep": "lockstep, exact scores, HiCache",
    "sparsespec-nodelay": "unified, exact scores, HiCache, no delayed verification",
    "sparsespec-draftnorm": "unified, draft scores, HiCache",
    "sparsespec-no-hicache": "unified, exact scores",
    "sparsespec-adaptive": "unified, exact scores, HiCache, adaptive speculation",
}
SATURATED_DEFAULT_RUNS = {"sparsespec"}
FASTEST_PLAIN = "fastest-plain"


@dataclass(frozen=True)
class Entry:
    """One table row: ``run`` over ``baseline`` at one shape of one result file (one process)."""

    label: str
    json: str | None  # file under benchmarks/results/; None: no same-process measurement yet
    run: str = "sparsespec-unified"
    baseline: str = "plain"
    batch: int | None = None  # pick the point when the file holds a grid
    output_len: int | None = None
    forced_accept: float | None = 7.0
    note: str = ""


SATURATED_NOTE = "consecutive processes on one warm machine, merged with bench_saturated.py --merge"
PAPER_WORKLOAD = "Qwen3-8B shape, the paper's workload at steady state (saturated pool, ~8K context, ~43 running)"

DEFAULT = [
    Entry(PAPER_WORKLOAD, "saturated_paper_workload_h100.json", "sparsespec", FASTEST_PLAIN, note=SATURATED_NOTE),
    Entry("Qwen3-8B shape, B 128, 512 in / 1024 out", "bench_adaptive_b128_1k_h100.json", baseline=FASTEST_PLAIN),
    Entry("Qwen3-8B shape, B 128, 512 in / 2048 out", "bench_unified_streams_exact_b128_2k_h100.json"),
    Entry("Qwen3-8B shape, B 128, 512 in / 4096 out", None),
    Entry("Qwen3-8B shape, B 16, 512 in / 16384 out", None),
]

NON_DEFAULT = [
    Entry("8B, B 128, 512 / 1024", "bench_adaptive_b128_1k_h100.json", "sparsespec-unified-adaptive",
          FASTEST_PLAIN),
    Entry(PAPER_WORKLOAD, "saturated_paper_workload_h100.json", "sparsespec-lockstep", FASTEST_PLAIN,
          note=SATURATED_NOTE),
    Entry("8B, B 128, 512 / 4096", "bench_b128_4k_plain_vs_draftnorm_h100.json", "sparsespec-draftnorm"),
    Entry("8B, B 128, 512 / 4096", "bench_b128_4k_plain_ngram_h100.json", "ngram"),
    Entry("8B, B 128, 512 / 4096", "bench_unified_streams_b128_4k_h100.json", "sparsespec-draftnorm-unified",
          baseline="sparsespec-draftnorm", note="no plain run in this process"),
    Entry("8B, B 128, 512 / 4096, KV pool 295K tokens", "bench_b128_4k_pool50_retract_vs_hicache_h100.json",
          "sparsespec-draftnorm-hicache", baseline="sparsespec-draftnorm", note="no plain run in this process"),
    Entry("8B, B 128, 512 / 4096, KV pool 295K tokens", "bench_b128_4k_pool50_plain_vs_plain_hicache_h100.json",
          "plain-hicache", forced_accept=None),
    Entry("1.7B, B 128, 512 / 4096", "bench_1.7b_b128_4k_h100.json", "sparsespec-draftnorm"),
    Entry("8B, B 16, 512 / 16384", "bench_b16_16k_h100.json", "sparsespec-draftnorm"),
    Entry("14B, B 32, 512 / 2048", "bench_14b_b32_64_2k_h100.json", "sparsespec-draftnorm", batch=32),
    Entry("14B, B 64, 512 / 2048", "bench_14b_b32_64_2k_h100.json", "sparsespec-draftnorm", batch=64),
    Entry("8B, B 128, 512 / 2048", "bench_unified_streams_exact_b128_2k_h100.json", "sparsespec"),
    Entry("8B, B 128, 512 / 2048", "bench_unified_final_b128_2k_h100.json", "sparsespec-draftnorm"),
    Entry("8B, B 128, 512 / 2048", "bench_unified_final_b128_2k_h100.json", "sparsespec-draftnorm-unified"),
    Entry("8B, B 128, 512 / 2048", "bench_unified_final_b128_2k_h100.json",
          "sparsespec-draftnorm-unified-nodelay"),
    Entry("8B, B 128, 512 / 2048", "bench_lockstep_vs_unified_b128_2k_h100.json", "sparsespec-draftnorm-unified",
          baseline="sparsespec-draftnorm", note="no plain run in this process"),
    Entry("8B, B 128, 512 / 2048", "bench_unified_delay_vs_nodelay_b128_2k_h100.json",
          "sparsespec-draftnorm-unified-nodelay", baseline="sparsespec-draftnorm-unified",
          note="no plain run in this process"),
    Entry("8B, B 32, 512 / 2048", "bench_batches_b32_64_128_2k_h100.json", "sparsespec-draftnorm", batch=32),
    Entry("8B, B 64, 512 / 2048", "bench_batches_b32_64_128_2k_h100.json", "sparsespec-draftnorm", batch=64),
    Entry("8B, B 128, 512 / 2048", "bench_batches_b32_64_128_2k_h100.json", "sparsespec-draftnorm", batch=128),
    *(Entry("8B, B 64, 512 / 2048", "bench_accept_b64_2k_h100.json", "sparsespec-draftnorm", forced_accept=a)
      for a in (1.0, 3.0, 5.0, 7.0)),
    Entry("8B, B 32, 512 / 1024", "bench_throughput_8b_h100.json", "ngram"),
    Entry("8B, B 32, 512 / 1024", "bench_throughput_8b_h100.json", "sparsespec",
          note="eager draft steps (before draft CUDA graphs)"),
    Entry("8B, B 128, 512 / 1536", "bench_throughput_8b_b128_draft_graphs_h100.json", "sparsespec",
          note="before the verify-kernel and fused-score changes"),
]


def _report(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def _saturated(report: dict) -> bool:
    """A bench_saturated.py result (its runs are configurations, not bench_throughput.py runs)."""
    return "mode" in report


def _points(report: dict) -> list[dict]:
    """The file's points as bench_throughput.py writes them (older one-shape files converted;
    a bench_saturated.py file's runs are points of one shape, its window throughput)."""
    if "points" in report:
        return report["points"]
    if _saturated(report):
        return [{"run": r["config"], "batch": None, "input_len": None, "output_len": None,
                 "forced_accept": r.get("forced_accept"), "output_tok_per_s": r["window"]["output_tok_per_s"]}
                for r in report["runs"] if "window" in r and "error" not in r]
    return [{"run": run, "batch": report["batch"], "input_len": report["input_len"],
             "output_len": report["output_len"], "forced_accept": r.get("forced_accept"), **r}
            for run, r in report["runs"].items()]


def _pick(points: list[dict], entry: Entry, run: str, forced: float | None) -> dict:
    hits = [p for p in points if p["run"] == run
            and (entry.batch is None or p["batch"] == entry.batch)
            and (entry.output_len is None or p["output_len"] == entry.output_len)
            and (run == "plain" or p.get("forced_accept") == forced)]
    if len(hits) != 1:
        raise ValueError(f"{entry.json}: {len(hits)} points for run {run!r} (batch {entry.batch}, "
                         f"output {entry.output_len}, forced accept {forced}); the entry must pick exactly one")
    return hits[0]


def measure(entry: Entry) -> dict:
    """Throughput of the entry's run and baseline and their ratio, from one result file."""
    report = _report(entry.json)
    points = _points(report)
    run = _pick(points, entry, entry.run, entry.forced_accept)
    if entry.baseline == FASTEST_PLAIN:  # what a user would run: plain SGLang's faster backend here
        plain = [p for p in points if p["run"].startswith("plain") and p.get("forced_accept") is None]
        base = max(plain, key=lambda p: p["output_tok_per_s"])
    else:
        base_forced = None if entry.baseline.startswith("plain") else entry.forced_accept
        base = _pick(points, entry, entry.baseline, base_forced)
    if (run["batch"], run["input_len"], run["output_len"]) != (base["batch"], base["input_len"], base["output_len"]):
        raise ValueError(f"{entry.json}: run and baseline measured at different shapes")
    commands = report["commands"] if "commands" in report else [report["command"]]
    return {"run_tok_s": run["output_tok_per_s"], "base_tok_s": base["output_tok_per_s"],
            "ratio": run["output_tok_per_s"] / base["output_tok_per_s"], "baseline": base["run"],
            "saturated": _saturated(report),
            "command": "; ".join("python " + _script_command(c) for c in commands)}


def _script_command(command: str) -> str:
    """The script and its arguments (a recorded interpreter path and output folder dropped)."""
    first, _, rest = command.partition(" ")
    if first.endswith(("python", "python3")):
        command = rest
    return command.replace("/root/out/", "")


def _accept(entry: Entry) -> str:
    return "-" if entry.forced_accept is None else f"{entry.forced_accept:g}"


def render_default(entries: list[Entry]) -> str:
    rows = ["| workload (H100, dummy weights, forced acceptance 7 = 6 of 8 drafts) | plain tok/s "
            "| SPARSESPEC tok/s | speedup | JSON (benchmarks/results/) |",
            "|---|---|---|---|---|"]
    commands = []
    for e in entries:
        if e.json is None:
            rows.append(f"| {e.label} | - | - | not measured: no same-process run of the default "
                        f"configuration yet (docs/results.md has non-default runs) | - |")
            continue
        m = measure(e)
        default = SATURATED_DEFAULT_RUNS if m["saturated"] else DEFAULT_RUNS
        if e.run not in default or e.baseline not in ("plain", FASTEST_PLAIN):
            raise ValueError(f"README table: {e.run} over {e.baseline} is not the default configuration "
                             "over plain SGLang; list it in NON_DEFAULT")
        rows.append(f"| {e.label} | {m['base_tok_s']:.0f} | {m['run_tok_s']:.0f} | **{m['ratio']:.2f}x** "
                    f"| `{e.json}` |")
        commands.append(f"- `{e.json}`: `{m['command']}` (the `{e.run}` run over `{m['baseline']}`"
                        + (f"; {e.note}" if e.note else "") + ")")
    return "\n".join(rows + [""] + commands)


def render_non_default(entries: list[Entry]) -> str:
    rows = ["| workload | configuration | forced accept | baseline | baseline tok/s | run tok/s | ratio "
            "| JSON (benchmarks/results/) |",
            "|---|---|---|---|---|---|---|---|"]
    for e in entries:
        m = measure(e)
        config = (SATURATED_CONFIGS if m["saturated"] else CONFIGS)[e.run] + (f"; {e.note}" if e.note else "")
        rows.append(f"| {e.label} | {config} | {_accept(e)} | {m['baseline']} | {m['base_tok_s']:.0f} "
                    f"| {m['run_tok_s']:.0f} | {m['ratio']:.2f}x | `{e.json}` |")
    return "\n".join(rows)


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- readme-table:{name} start -->", f"<!-- readme-table:{name} end -->"


def replace_table(text: str, name: str, table: str) -> str:
    start, end = _markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise ValueError(f"need exactly one {start!r} and one {end!r}")
    head, rest = text.split(start)
    _, tail = rest.split(end)
    return f"{head}{start}\n{table}\n{end}{tail}"


def tables() -> dict[str, str]:
    return {"default": render_default(DEFAULT), "non-default": render_non_default(NON_DEFAULT)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = ap.parse_args(argv)
    stale = []
    for name, table in tables().items():
        path = TARGETS[name]
        text = path.read_text()
        new = replace_table(text, name, table)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"tables differ from benchmarks/results/ in: {', '.join(stale)}; "
              "run python scripts/readme_table.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
