"""Prefix reuse under speculation: plain SGLang vs SPARSESPEC on SGLang's own ``generated-shared-prefix``
dataset through SGLang's own ``bench_serving``, with the radix-cache hit rate each server reports.

Why: SGLang users report that EAGLE cuts radix-cache hits (97% down to 40-53%) on shared-prefix
workloads. SPARSESPEC drafts with the target model over the target's own KV cache, so its servers
should keep plain SGLang's hit rate; this script measures it next to throughput.

For each configuration, one after the other, on the same model and dataset:

1. launch ``python -m sglang.launch_server --enable-metrics`` with the configuration's flags plus,
   for every configuration alike, ``--max-running-requests R --cuda-graph-max-bs-decode R
   --disable-prefill-cuda-graph`` (the dataset's requests all arrive at once, so a queue forms and
   the radix cache has to hold the shared system prompts while the batch turns over);
2. wait for ``/health`` (bench_saturated's helpers: process groups, ``PR_SET_PDEATHSIG``), scrape
   ``/metrics``;
3. run ``bench_serving --backend sglang --dataset-name generated-shared-prefix --gsp-num-groups G
   --gsp-prompts-per-group P --gsp-system-prompt-len S --gsp-question-len Q --gsp-output-len O
   --cache-report --seed SEED --output-file ...`` (one subprocess: ``this script tool -- ARGS`` runs
   the module the project resolves bench_serving to, ``sparsespec_sglang.compat``, with its own
   parser; every request arrives at once, streamed, ``ignore_eos``, bench_serving's default temperature 0);
4. scrape ``/metrics`` again and stop the server.

Numbers per configuration: bench_serving's own result (``output_throughput``,
``request_throughput``, duration, its ``cache_report``: the per-request ``cached_tokens`` SGLang
returns over the prompt tokens) and the server's view, from its Prometheus counters between the two
scrapes: ``sglang:cached_tokens_total`` (every ``cache_source``) over ``sglang:prompt_tokens_total``
(both counted per finished request; bench_serving's one warm-up request is included there, not in
its cache_report), plus SGLang's ``sglang:cache_hit_rate`` gauge at the end (the last logging
interval only). ``over_fastest_plain``: each speculative configuration's throughputs over the plain
configuration with the higher output tokens/s, and its hit rate next to that plain's.

Random weights (``--shape``: ``--load-format dummy``, a model directory from
``sparsespec_sglang.testing.model_dirs``) accept nothing real: ``--forced-accept A`` sets SGLang's
benchmark-only ``SGLANG_SIMULATE_ACC_LEN`` for speculative servers only, announced and recorded in
``forced_acceptance``. With ``--model-path`` (real weights) acceptance is the model's own.

    python scripts/bench_prefix_reuse.py --model-path /path/to/model \\
        --out benchmarks/results/prefix_reuse.json
    python scripts/bench_prefix_reuse.py --shape qwen3-8b --forced-accept 7 --out prefix_reuse_dummy.json

Configurations (``--configs``):

    plain             --attention-backend triton
    plain-flashinfer  --attention-backend flashinfer
    sparsespec        --speculative-algorithm SPARSESPEC (every SPARSESPEC default)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))  # scripts/ is not a package

import bench_saturated as bs  # noqa: E402  (launch, wait, stop, /metrics parsing)
from cli import ArgumentError, OneLineParser, refuse  # noqa: E402
from bench_real_weights import parse_result_file  # noqa: E402  (bench tools append one JSON line per run)

PROG = "bench_prefix_reuse.py"
CONFIGS: dict[str, list[str]] = {
    "plain": ["--attention-backend", "triton"],
    "plain-flashinfer": ["--attention-backend", "flashinfer"],
    "sparsespec": ["--speculative-algorithm", "SPARSESPEC"],
}
FORCED_ACCEPT_ENV = "SGLANG_SIMULATE_ACC_LEN"
DEFAULT_K = 8  # SPARSESPEC's default --speculative-num-steps: forced acceptance is at most k + 1
# SGLang's Prometheus series (sglang/srt/observability/metrics_collector.py, 0.5.17 to 0.5.23).
PROMPT_TOKENS = "sglang:prompt_tokens_total"
CACHED_TOKENS = "sglang:cached_tokens_total"
REQUESTS = "sglang:num_requests_total"
GENERATION_TOKENS = "sglang:generation_tokens_total"
HIT_RATE_GAUGE = "sglang:cache_hit_rate"
# bench_serving's result fields this report keeps (its whole last result line is kept too).
RESULT_FIELDS = ("completed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                 "output_throughput", "total_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_e2e_latency_ms",
                 "accept_length")


# ---------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class CacheCounts:
    """What the server counted between two scrapes (finished requests only)."""

    prompt_tokens: float
    cached_tokens: float
    cached_by_source: dict[str, float]
    requests: Optional[float]
    generation_tokens: Optional[float]

    @property
    def hit_rate(self) -> Optional[float]:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens > 0 else None


def _counter_delta(before: bs.Scrape, after: bs.Scrape, name: str, **labels: str) -> Optional[float]:
    end = after.counter(name, **labels)
    if end is None:
        return None
    return end - (before.counter(name, **labels) or 0.0)


def cache_counts(before: bs.Scrape, after: bs.Scrape) -> CacheCounts:
    """Prompt and cached tokens between two ``/metrics`` scrapes. ``sglang:cached_tokens_total`` is
    split by ``cache_source`` (device, host, storage_*, or total where SGLang has no breakdown) and
    appears only once a request hit the cache: absent means none."""
    prompt = _counter_delta(before, after, PROMPT_TOKENS)
    if prompt is None:
        raise ValueError(f"/metrics has no {PROMPT_TOKENS}: is --enable-metrics on?")
    sources = sorted({dict(labels).get("cache_source", "total") for name, labels in after.samples
                      if name == CACHED_TOKENS})
    by_source = {s: _counter_delta(before, after, CACHED_TOKENS, cache_source=s) or 0.0 for s in sources}
    return CacheCounts(prompt_tokens=prompt, cached_tokens=sum(by_source.values()), cached_by_source=by_source,
                       requests=_counter_delta(before, after, REQUESTS),
                       generation_tokens=_counter_delta(before, after, GENERATION_TOKENS))


def run_numbers(result: Mapping[str, Any], counts: CacheCounts, hit_rate_gauge: Optional[float]) -> dict:
    """One configuration's numbers: bench_serving's throughputs and cache report, the server's counters."""
    report = result.get("cache_report") or {}
    pct = report.get("cache_hit_rate_pct")
    return {
        "output_tok_per_s": result["output_throughput"],
        "request_throughput": result["request_throughput"],
        "bench_serving": {k: result.get(k) for k in RESULT_FIELDS},
        "bench_cache_report": report or None,
        "bench_cache_hit_rate": pct / 100.0 if pct is not None else None,
        "metrics_cache_hit_rate": counts.hit_rate,
        "metrics": {**dataclasses.asdict(counts), "cache_hit_rate_gauge_last": hit_rate_gauge},
    }


def add_ratios(report: dict) -> None:
    """``over_fastest_plain``: each speculative run over the plain run with the higher output tokens/s
    (a user runs plain SGLang with its faster backend): throughput ratios, and both hit rates."""
    runs = [r for r in report["runs"] if "error" not in r]
    plain = [r for r in runs if not bs.is_speculative(CONFIGS[r["config"]])]
    report.pop("over_fastest_plain", None)
    if not plain:
        return
    best = max(plain, key=lambda r: r["output_tok_per_s"])
    out = {}
    for r in runs:
        if not bs.is_speculative(CONFIGS[r["config"]]):
            continue
        entry = {"baseline": best["config"],
                 "output_tok_per_s": r["output_tok_per_s"] / best["output_tok_per_s"],
                 "request_throughput": r["request_throughput"] / best["request_throughput"]}
        for key in ("metrics_cache_hit_rate", "bench_cache_hit_rate"):
            entry[key] = {"run": r[key], "baseline": best[key]}
        out[f"{r['config']}/{best['config']}"] = entry
    report["over_fastest_plain"] = out


# ---------------------------------------------------------------- commands


def server_command(model: str, dummy: bool, port: int, flags: Sequence[str], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
           "--port", str(port), "--enable-metrics", "--mem-fraction-static", str(args.mem_fraction),
           "--max-running-requests", str(args.max_running_requests),
           "--cuda-graph-max-bs-decode", str(args.max_running_requests), "--disable-prefill-cuda-graph",
           "--log-level", "info", *flags]
    if dummy:
        cmd += ["--load-format", "dummy"]
    return cmd + list(args.server_args)


def bench_args(base_url: str, args: argparse.Namespace, output_file: Path) -> list[str]:
    """bench_serving's flags (its own parser reads them): the shared-prefix dataset, all requests at once."""
    return ["--backend", "sglang", "--base-url", base_url, "--dataset-name", "generated-shared-prefix",
            "--num-prompts", str(args.gsp_num_groups * args.gsp_prompts_per_group),
            "--gsp-num-groups", str(args.gsp_num_groups), "--gsp-prompts-per-group", str(args.gsp_prompts_per_group),
            "--gsp-system-prompt-len", str(args.gsp_system_prompt_len),
            "--gsp-question-len", str(args.gsp_question_len), "--gsp-output-len", str(args.gsp_output_len),
            "--seed", str(args.seed), "--cache-report", "--output-file", str(output_file)]


def tool_main(argv: Sequence[str]) -> int:
    """``tool -- ARGS``: SGLang's bench_serving CLI with ARGS, from the module the project resolves
    it to in the installed release; its dataset registry imports Hugging Face ``datasets`` at
    module level, for loaders this dataset never calls (workload.py's stand-in where it is absent)."""
    rest = list(argv[1:] if argv[:1] == ["--"] else argv)
    import workload

    workload._allow_without_hf_datasets()
    from sparsespec_sglang.compat import bench_serving

    sys.argv = [bench_serving.__name__, *rest]
    bench_serving.cli_main()
    return 0


def run_one(name: str, model: str, dummy: bool, args: argparse.Namespace, work: Path) -> dict:
    flags = CONFIGS[name]
    env, forced = bs.server_env(flags, args.forced_accept, os.environ)
    if forced is not None:
        print(f"WARNING [{name}]: benchmark-only forced acceptance {FORCED_ACCEPT_ENV}={forced} "
              "(accepted tokens per cycle incl. the bonus; outputs are not the model's)", flush=True)
    port = bs.free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(model, dummy, port, flags, args)
    log, bench_log, result_file = (work / f"{name}.{suffix}" for suffix in ("server.log", "bench.log", "bench.jsonl"))
    load_cmd = [sys.executable, str(Path(__file__).resolve()), "tool", "--", *bench_args(base_url, args, result_file)]
    record: dict[str, Any] = {"config": name, "server_flags": flags, "server_command": shlex.join(cmd),
                              "bench_command": shlex.join(load_cmd), "forced_accept": forced,
                              "server_log": str(log), "bench_log": str(bench_log)}
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    server = None
    t0 = time.monotonic()
    try:
        with open(log, "w") as f:
            server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=bs.child_setup)
        record["startup_s"] = bs.wait_ready(base_url, server, args.startup_timeout, log)
        before = bs.scrape(base_url)
        # bench_serving's table goes to the log; its tqdm bar (stderr) stays on the terminal.
        with open(bench_log, "w") as f:
            load = subprocess.run(load_cmd, stdout=f, env={k: v for k, v in os.environ.items()
                                                          if k != FORCED_ACCEPT_ENV},
                                  preexec_fn=bs.child_setup, timeout=args.bench_timeout)
        after = bs.scrape(base_url)
        result = parse_result_file(result_file)
        if load.returncode != 0 or result is None:
            raise RuntimeError(f"bench_serving exited with {load.returncode}; log tail:\n{bs._tail(bench_log)}")
        record.update(run_numbers(result, cache_counts(before, after), after.gauge(HIT_RATE_GAUGE)))
        record["bench_result"] = result
        hit = record["metrics_cache_hit_rate"]
        print(f"[{name}] {record['output_tok_per_s']:.1f} output tok/s, {record['request_throughput']:.2f} req/s, "
              f"cache hit rate {'n/a' if hit is None else f'{hit:.3f}'} (server), "
              f"{record['bench_cache_hit_rate']} (bench_serving)"
              + (f" (FORCED acceptance {forced})" if forced is not None else ""), flush=True)
    except Exception as e:  # the record keeps the error and where the logs are
        record["error"] = str(e)
        print(f"[{name}] FAILED: {e}", flush=True)
    finally:
        bs.stop(server)
        record["wall_s"] = time.monotonic() - t0
    return record


# ---------------------------------------------------------------- arguments


def _positive_int(flag: str, text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ArgumentError(f"{flag}: a positive integer (got {text!r})")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON")
    model = ap.add_mutually_exclusive_group()
    model.add_argument("--model-path", default=None, help="a model directory with real weights")
    model.add_argument("--shape", default="qwen3-8b",
                       help="random weights (--load-format dummy) of this sparsespec_sglang.testing.model_dirs "
                            "shape, when no --model-path (default: %(default)s)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma list, run in this order; allowed: {', '.join(CONFIGS)} (default: %(default)s)")
    ap.add_argument("--forced-accept", default=None,
                    help=f"speculative servers only: {FORCED_ACCEPT_ENV}, accepted tokens per cycle incl. the "
                         f"bonus, in [1, {DEFAULT_K + 1}] (for random weights; default: natural acceptance)")
    for flag, default, what in (("--gsp-num-groups", 64, "shared system prompts"),
                                ("--gsp-prompts-per-group", 16, "requests per system prompt"),
                                ("--gsp-system-prompt-len", 2048, "tokens of each system prompt"),
                                ("--gsp-question-len", 128, "tokens of each request's own question"),
                                ("--gsp-output-len", 256, "tokens each request generates")):
        ap.add_argument(flag, default=str(default), help=f"bench_serving's {flag}: {what} (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=42, help="bench_serving's --seed: the dataset (default: %(default)s)")
    ap.add_argument("--max-running-requests", default="128",
                    help="--max-running-requests and --cuda-graph-max-bs-decode of every server (default: %(default)s)")
    ap.add_argument("--mem-fraction", type=float, default=0.85, help="--mem-fraction-static (default: %(default)s)")
    ap.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a server may take to start")
    ap.add_argument("--bench-timeout", type=float, default=1800.0, help="seconds bench_serving may take per server")
    ap.add_argument("--server-args", default="",
                    help='extra launch_server flags for every configuration, one quoted string: --server-args="--tp 2"')
    return ap


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise ArgumentError(f"--configs: unknown {', '.join(bad) or '(empty)'}; allowed: {', '.join(CONFIGS)}")
    if len(set(names)) != len(names):
        raise ArgumentError(f"--configs: a configuration is named twice ({args.configs}); "
                            f"allowed: {', '.join(CONFIGS)}")
    args.names = names
    if args.model_path is not None:
        if not (Path(args.model_path) / "config.json").is_file():
            raise ArgumentError(f"--model-path: no config.json in {args.model_path} (a model directory)")
    else:
        from sparsespec_sglang.testing.model_dirs import SHAPES

        if args.shape not in SHAPES:
            raise ArgumentError(f"--shape: unknown {args.shape}; allowed: {', '.join(SHAPES)}")
    if args.forced_accept is not None:
        try:
            args.forced_accept = float(args.forced_accept)
        except ValueError:
            args.forced_accept = -1.0
        if not 1 <= args.forced_accept <= DEFAULT_K + 1:
            raise ArgumentError(f"--forced-accept: a number in [1, {DEFAULT_K + 1}] (accepted tokens per cycle "
                                f"incl. the bonus, k = {DEFAULT_K})")
    for flag in ("--gsp-num-groups", "--gsp-prompts-per-group", "--gsp-system-prompt-len", "--gsp-question-len",
                 "--gsp-output-len", "--max-running-requests"):
        dest = flag[2:].replace("-", "_")
        setattr(args, dest, _positive_int(flag, getattr(args, dest)))
    if not 0 < args.mem_fraction < 1:
        raise ArgumentError(f"--mem-fraction: a fraction in (0, 1) (got {args.mem_fraction})")
    args.server_args = shlex.split(args.server_args)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tool"]:
        return tool_main(argv[1:])
    try:
        args = parse_args(argv)
    except ArgumentError as e:
        return refuse(PROG, e)
    import torch

    if not torch.cuda.is_available():
        print(f"{PROG}: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)", file=sys.stderr)
        return 2
    from tqdm import tqdm

    from sparsespec_sglang.testing import provenance

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_prefix_reuse_"))
    dummy = args.model_path is None
    if dummy:
        from sparsespec_sglang.testing.model_dirs import make_model_dir

        model = str(make_model_dir(work / args.shape, args.shape, with_weights=False, dtype="bfloat16"))
    else:
        model = str(Path(args.model_path).resolve())
    report: dict[str, Any] = {
        "command": shlex.join(["python", "scripts/" + PROG, *argv]), "commit": provenance.commit(),
        "gpu": bs.gpu_name(), "machine": platform.node(), "versions": bs.versions(),
        "model": {"path": args.model_path, "shape": None if args.model_path else args.shape,
                  "weights": "random (--load-format dummy)" if dummy else "real"},
        "dataset": {"name": "generated-shared-prefix", "num_groups": args.gsp_num_groups,
                    "prompts_per_group": args.gsp_prompts_per_group,
                    "system_prompt_len": args.gsp_system_prompt_len, "question_len": args.gsp_question_len,
                    "output_len": args.gsp_output_len, "seed": args.seed},
        "settings": {"max_running_requests": args.max_running_requests, "mem_fraction": args.mem_fraction,
                     "server_args": args.server_args},
        "work_dir": str(work), "runs": [],
    }
    # A SIGTERM (e.g. `timeout`) unwinds through run_one's `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    for name in tqdm(args.names, desc="configurations", unit="server", file=sys.stderr):
        report["runs"].append(run_one(name, model, dummy, args, work))
        report["forced_acceptance"] = {r["config"]: r.get("forced_accept") for r in report["runs"]}
        add_ratios(report)
        out.write_text(json.dumps(report, indent=1))  # after every run: a call cut short keeps the finished ones
    for key, entry in report.get("over_fastest_plain", {}).items():
        hit = entry["metrics_cache_hit_rate"]
        print(f"{key}: output tok/s {entry['output_tok_per_s']:.3f}x, requests/s {entry['request_throughput']:.3f}x, "
              f"cache hit rate {hit['run']} vs {hit['baseline']}", flush=True)
    print(f"wrote {out}", flush=True)
    return 1 if any("error" in r for r in report["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
