"""Saturated steady-state throughput: an SGLang server under the paper's workload, measured over
a fixed window once its KV pool is full and its running batch stable.

Why: a whole-run average (everything submitted, run to the end) mixes the ramp-up, a half-empty
pool and the tail; self-speculation wins only where decoding is memory-bound over long contexts
at a full pool. This script launches ``python -m sglang.launch_server`` (``--enable-metrics``),
drives it with SGLang's own ``bench_serving`` (``scripts/workload.py replay``: the paper's
workload, exact per-request lengths, ``ignore_eos``), polls ``/metrics`` until the pool is
saturated and the batch stable, then measures output tokens/s from SGLang's per-step token
counter ``sglang:realtime_tokens_total{mode="decode"}`` between two scrapes ``--window`` seconds
apart. (``sglang:generation_tokens_total`` only counts a request when it finishes: useless in a
window shorter than the requests.) Then it stops the load and the server.

Modes (labelled in the output):

* ``steady-state``: after the server starts, its pool size P is read from ``/server_info`` and
  ``ceil(--mid-run-fill * P / E[mid-run context])`` mid-run requests (``workload.mid_run``:
  contexts a saturated server holds mid-run) go first, then the workload's fresh requests: the
  pool is full right after prefill.
* ``decode-fill``: only fresh requests; the pool fills by decoding (slow: minutes at 13K outputs).

Random weights (``--load-format dummy``) make acceptance meaningless, so speculative servers
run with SGLang's benchmark-only ``SGLANG_SIMULATE_ACC_LEN`` (accepted tokens per cycle incl.
the bonus); the output says so for every run that uses it, and never for a plain server.

    python scripts/bench_saturated.py --pair plain,sparsespec --mode steady-state \\
        --out benchmarks/results/saturated_plain_vs_sparsespec_h200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from sparsespec_sglang.testing import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload as wl  # noqa: E402  (scripts/ is not a package)

REPO = Path(__file__).resolve().parent.parent
MODES = ("steady-state", "decode-fill")
DECODE_COUNTER = "sglang:realtime_tokens_total"
RETRACT_COUNTER = "sglang:num_retracted_requests_total"


def config_flags(name: str, k: int, hicache_size_gb: int) -> list[str]:
    """Server flags of a named configuration (``--speculative-*`` / ``--sparsespec-*``; see
    sparsespec_sglang/config.py). ``sparsespec`` is the default SPARSESPEC server plus
    SGLang's hierarchical cache, so retracted requests keep their KV on the host (the paper's
    KV manager); the ablations change one thing each."""
    hicache = ["--enable-hierarchical-cache", "--hicache-size", str(hicache_size_gb)]
    sparsespec = ["--speculative-algorithm", "SPARSESPEC", "--speculative-num-steps", str(k)]
    configs = {
        "plain": ["--attention-backend", "triton"],
        "plain-flashinfer": ["--attention-backend", "flashinfer"],
        "plain-hicache": ["--attention-backend", "triton", *hicache, "--sparsespec-keep-retracted-kv"],
        "ngram": ["--attention-backend", "triton", "--speculative-algorithm", "NGRAM",
                  "--speculative-num-draft-tokens", str(k + 1)],
        "sparsespec": [*sparsespec, *hicache],
        "sparsespec-lockstep": [*sparsespec, *hicache, "--sparsespec-schedule", "lockstep"],
        "sparsespec-nodelay": [*sparsespec, *hicache, "--sparsespec-disable-delayed-verify"],
        "sparsespec-draftnorm": [*sparsespec, *hicache, "--sparsespec-score-norm", "draft"],
        "sparsespec-no-hicache": sparsespec,
        "sparsespec-adaptive": [*sparsespec, *hicache, "--sparsespec-adaptive", "on"],
    }
    return configs[name]


CONFIGS = ("plain", "plain-flashinfer", "plain-hicache", "ngram", "sparsespec", "sparsespec-lockstep", "sparsespec-nodelay",
           "sparsespec-draftnorm", "sparsespec-no-hicache", "sparsespec-adaptive")


def is_speculative(flags: Sequence[str]) -> bool:
    return "--speculative-algorithm" in flags


# ---------------------------------------------------------------- /metrics scrapes


@dataclasses.dataclass(frozen=True)
class Scrape:
    """One ``/metrics`` scrape: time (monotonic seconds) and every sample
    ``(name, sorted label items) -> value``."""

    t: float
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    def _matching(self, name: str, labels: dict[str, str]) -> list[float]:
        return [v for (n, ls), v in self.samples.items()
                if n == name and all(dict(ls).get(k) == want for k, want in labels.items())]

    def counter(self, name: str, **labels: str) -> Optional[float]:
        """Sum over the series of a counter (every rank / process), None if absent."""
        vals = self._matching(name, labels)
        return sum(vals) if vals else None

    def gauge(self, name: str, **labels: str) -> Optional[float]:
        """Mean over the series of a gauge (one per rank), None if absent."""
        vals = self._matching(name, labels)
        return sum(vals) / len(vals) if vals else None

    def names(self, prefix: str) -> list[str]:
        return sorted({n for n, _ in self.samples if n.startswith(prefix)})


def parse_metrics(text: str, t: float) -> Scrape:
    """Parse Prometheus text exposition (SGLang's ``/metrics``) with prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return Scrape(t=t, samples=samples)


def scrape(base_url: str, timeout: float = 10.0) -> Scrape:
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    return parse_metrics(text, time.monotonic())


# ---------------------------------------------------------------- saturation and the window


@dataclasses.dataclass(frozen=True)
class Saturation:
    """When a server counts as saturated: over the last ``stable_s`` seconds every scrape has
    requests waiting (the server, not the client, is the limit) and a full pool
    (``sglang:token_usage >= usage``) or a full batch (``max_running`` requests), and the
    running batch moved by at most ``tolerance`` of its size."""

    usage: float = 0.85
    stable_s: float = 10.0
    tolerance: float = 0.1
    max_running: Optional[int] = None

    def holds(self, history: Sequence[Scrape]) -> bool:
        if not history:
            return False
        now = history[-1].t
        if now - history[0].t < self.stable_s:
            return False
        recent = [s for s in history if s.t >= now - self.stable_s]
        running = [s.gauge("sglang:num_running_reqs") or 0.0 for s in recent]
        for s, r in zip(recent, running):
            full_pool = (s.gauge("sglang:token_usage") or 0.0) >= self.usage
            full_batch = self.max_running is not None and r >= self.max_running
            if (s.gauge("sglang:num_queue_reqs") or 0.0) <= 0 or not (full_pool or full_batch):
                return False
        return min(running) > 0 and max(running) - min(running) <= self.tolerance * max(running)


def first_saturated(history: Sequence[Scrape], rule: Saturation) -> Optional[float]:
    """Time of the first scrape at which ``rule`` holds (for a recorded series), else None."""
    for i in range(len(history)):
        if rule.holds(history[: i + 1]):
            return history[i].t
    return None


def _stats(values: list[float]) -> Optional[dict]:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def _delta(start: Scrape, end: Scrape, name: str, **labels: str) -> Optional[float]:
    a, b = start.counter(name, **labels), end.counter(name, **labels)
    if b is None:
        return None
    return b - (a or 0.0)


def window_stats(start: Scrape, end: Scrape, samples: Sequence[Scrape]) -> dict:
    """What the server did between two scrapes. Throughput is the growth of SGLang's per-step
    decode token counter (every accepted token, speculative or not) over the elapsed time;
    batch, pool use and acceptance are the gauges of the scrapes inside the window."""
    seconds = end.t - start.t
    if seconds <= 0:
        raise ValueError(f"window end {end.t} is not after its start {start.t}")
    decode = _delta(start, end, DECODE_COUNTER, mode="decode")
    if decode is None:
        raise ValueError(f"/metrics has no {DECODE_COUNTER}{{mode=\"decode\"}}: is --enable-metrics on?")
    inside = [s for s in samples if start.t <= s.t <= end.t]

    def gauges(name: str) -> Optional[dict]:
        return _stats([v for s in inside if (v := s.gauge(name)) is not None])

    contexts = [lens / running for s in inside
                if (lens := s.gauge("sglang:decode_sum_seq_lens")) is not None
                and (running := s.gauge("sglang:num_running_reqs"))]

    out = {
        "seconds": seconds,
        "output_tokens": decode,
        "output_tok_per_s": decode / seconds,
        "prefill_tokens": _delta(start, end, DECODE_COUNTER, mode="prefill_compute") or 0.0,
        # A labelled counter appears on /metrics at its first increment: absent means none yet.
        "retracted_requests": _delta(start, end, RETRACT_COUNTER) or 0.0,
        "finished_requests_output_tokens": _delta(start, end, "sglang:generation_tokens_total") or 0.0,
        "num_scrapes": len(inside),
        "running_requests": gauges("sglang:num_running_reqs"),
        "context_tokens_per_running_request": _stats(contexts),
        "queued_requests": gauges("sglang:num_queue_reqs"),
        "token_usage": gauges("sglang:token_usage"),
        "sglang_gen_throughput": gauges("sglang:gen_throughput"),
        "spec_accept_length": gauges("sglang:spec_accept_length"),
    }
    for name in end.names("sparsespec:"):
        out[name] = gauges(name)
    return out


# ---------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_setup() -> None:
    """``preexec_fn`` of every process this script starts: its own process group (``stop`` signals
    the whole tree) and, on Linux, SIGTERM when this script dies (``PR_SET_PDEATHSIG``), so a
    benchmark killed from outside never leaves a server holding the GPU."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop(proc: Optional[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Stop a process this script started and its children (it leads its own process group)."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        # Wait for the whole group (a server's scheduler holds the GPU after its parent exits).
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)


def _get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def wait_ready(base_url: str, proc: subprocess.Popen, timeout_s: float, log: Path) -> float:
    """Seconds until ``/health`` answers 200 (SGLang answers 503 until its warm-up request is
    done); raises with the log's tail if the server dies."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup; log tail:\n"
                               + _tail(log))
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - start
        except OSError:  # refused, or HTTPError 503 while starting
            pass
        time.sleep(2)
    raise TimeoutError(f"server not ready after {timeout_s:.0f} s (--startup-timeout); log tail:\n" + _tail(log))


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def pool_tokens(base_url: str) -> int:
    """The server's KV pool size in tokens (``max_total_num_tokens`` in ``/server_info``)."""
    info = _get_json(f"{base_url}/server_info")
    if "max_total_num_tokens" in info:
        return int(info["max_total_num_tokens"])
    value = scrape(base_url).gauge("sglang:max_total_num_tokens")
    if value is None:
        raise RuntimeError(f"{base_url}: neither /server_info nor /metrics gives max_total_num_tokens")
    return int(value)


def num_mid_run(pool: int, fresh: Sequence[wl.Request], fill: float) -> int:
    """Mid-run requests whose contexts fill ``fill`` times the pool."""
    return max(1, min(len(fresh), math.ceil(fill * pool / wl.mid_run_mean_context(fresh))))


def measure(base_url: str, rule: Saturation, *, window_s: float, poll_s: float, timeout_s: float,
            alive: Callable[[], Optional[str]], get: Callable[[str], Scrape] = scrape,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> dict:
    """Poll until ``rule`` holds (or ``timeout_s``: measured anyway, ``saturated`` false), then
    measure a ``window_s`` window. ``alive()`` returns a reason when the server or load died."""
    history: list[Scrape] = []
    start = clock()
    saturated = False
    while True:
        if (why := alive()) is not None:
            raise RuntimeError(why)
        history.append(get(base_url))
        if rule.holds(history):
            saturated = True
            break
        if clock() - start >= timeout_s:
            break
        sleep(poll_s)
    fill_s = clock() - start
    first, samples = history[-1], [history[-1]]
    while samples[-1].t - first.t < window_s:
        sleep(min(poll_s, max(0.0, window_s - (samples[-1].t - first.t))))
        if (why := alive()) is not None:
            raise RuntimeError(why)
        samples.append(get(base_url))
    window = window_stats(first, samples[-1], samples)
    trace = [{"t": round(s.t - start, 2), "running": s.gauge("sglang:num_running_reqs"),
              "queued": s.gauge("sglang:num_queue_reqs"), "token_usage": s.gauge("sglang:token_usage"),
              "decode_tokens": s.counter(DECODE_COUNTER, mode="decode")} for s in history + samples[1:]]
    return {"saturated": saturated, "time_to_saturation_s": fill_s, "window": window, "trace": trace}


# ---------------------------------------------------------------- one run, a pair


def server_command(model_dir: str, port: int, flags: Sequence[str], args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_dir, "--load-format", "dummy",
           "--host", "127.0.0.1", "--port", str(port), "--enable-metrics",
           "--mem-fraction-static", str(args.mem_fraction), "--max-running-requests", str(args.max_running_requests),
           "--cuda-graph-max-bs-decode", str(args.cuda_graph_max_bs), "--decode-log-interval",
           str(args.decode_log_interval), "--log-level", args.log_level, *flags]
    if args.disable_prefill_cuda_graph:
        cmd.append("--disable-prefill-cuda-graph")
    return cmd + list(args.server_args)


def server_env(flags: Sequence[str], forced_accept: Optional[float],
               base: Mapping[str, str]) -> tuple[dict, Optional[float]]:
    """The server's environment and its forced acceptance: ``SGLANG_SIMULATE_ACC_LEN`` for a
    speculative server only (random weights accept nothing real), never inherited by a plain one;
    ``forced_accept`` None: natural acceptance for every server (real weights)."""
    env = {k: v for k, v in base.items() if k != "SGLANG_SIMULATE_ACC_LEN"}
    if forced_accept is None or not is_speculative(flags):
        return env, None
    env["SGLANG_SIMULATE_ACC_LEN"] = str(forced_accept)
    return env, forced_accept


def run_one(name: str, model_dir: str, fresh: list[wl.Request], args: argparse.Namespace, work: Path) -> dict:
    flags = config_flags(name, args.k, args.hicache_size)
    env, forced = server_env(flags, args.forced_accept, os.environ)
    if forced is not None:
        print(f"WARNING [{name}]: benchmark-only forced acceptance SGLANG_SIMULATE_ACC_LEN={forced} "
              "(accepted tokens per cycle incl. the bonus; outputs are not the model's)", flush=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    cmd = server_command(model_dir, port, flags, args)
    log = work / f"{name}.server.log"
    load_log = work / f"{name}.load.log"
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    record: dict[str, Any] = {"config": name, "server_flags": flags, "server_command": " ".join(cmd),
                              "forced_accept": forced, "server_log": str(log)}
    server = load = None
    t0 = time.monotonic()
    try:
        with open(log, "w") as f:
            server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=child_setup)
        record["startup_s"] = wait_ready(base_url, server, args.startup_timeout, log)
        record["pool_tokens"] = pool_tokens(base_url)
        reqs = list(fresh)
        if args.mode == "steady-state":
            record["num_mid_run"] = num_mid_run(record["pool_tokens"], fresh, args.mid_run_fill)
            reqs = wl.steady_state(fresh, record["num_mid_run"], seed=args.seed, vocab_size=args.vocab_size)
        record["requests"] = wl.summary(reqs)
        path = work / f"{name}.workload.jsonl"
        wl.write_jsonl(reqs, path)
        load_cmd = [sys.executable, str(Path(__file__).with_name("workload.py")), "replay", "--workload",
                    str(path), "--base-url", base_url, "--temperature", str(args.temperature),
                    "--max-concurrency", str(args.max_concurrency)]
        with open(load_log, "w") as f:
            load = subprocess.Popen(load_cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=child_setup)

        def alive() -> Optional[str]:
            if server.poll() is not None:
                return f"[{name}] server exited with {server.returncode}; log tail:\n{_tail(log)}"
            if load.poll() is not None:
                return f"[{name}] bench_serving load exited with {load.returncode}; log tail:\n{_tail(load_log)}"
            return None

        rule = Saturation(usage=args.saturation_usage, stable_s=args.stable_s, tolerance=args.stable_tolerance,
                          max_running=args.max_running_requests)
        timeout = args.saturation_timeout
        record.update(measure(base_url, rule, window_s=args.window, poll_s=args.poll, timeout_s=timeout,
                              alive=alive))
        w = record["window"]
        running = w["running_requests"]
        record["cuda_graph_covers_batch"] = running is not None and running["max"] <= args.cuda_graph_max_bs
        print(f"[{name}] {'SATURATED' if record['saturated'] else 'NOT SATURATED (timeout)'} after "
              f"{record['time_to_saturation_s']:.0f} s; window {w['seconds']:.0f} s: "
              f"{w['output_tok_per_s']:.1f} output tok/s, running {w['running_requests']}, "
              f"token_usage {w['token_usage']}, retracted {w['retracted_requests']}, "
              f"accept length {w['spec_accept_length']}"
              + (f" (FORCED acceptance {forced})" if forced is not None else ""), flush=True)
    except Exception as e:  # the record keeps what was measured, the error and the log's tail
        record["error"] = str(e)
        print(f"[{name}] FAILED: {e}", flush=True)
    finally:
        stop(load, grace_s=10)
        stop(server)
        record["wall_s"] = time.monotonic() - t0
    return record


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("sglang", "torch", "transformers", "sparsespec-sglang", "triton"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "none"


def add_ratios(report: dict) -> None:
    """``ratio``: every run's window throughput over the first (baseline) run's."""
    runs = [r for r in report["runs"] if "window" in r and "error" not in r]
    if len(runs) < 2:
        return
    base = runs[0]
    report["ratio"] = {f"{r['config']}/{base['config']}":
                       r["window"]["output_tok_per_s"] / base["window"]["output_tok_per_s"] for r in runs[1:]}
    # A user runs plain SGLang with its fastest backend: with two plain runs, ratios are over the faster.
    plain = [r for r in runs if not is_speculative(config_flags(r["config"], 8, 0))]
    if len(plain) > 1:
        best = max(plain, key=lambda r: r["window"]["output_tok_per_s"])
        report["ratio_over_fastest_plain"] = {
            f"{r['config']}/{best['config']}": r["window"]["output_tok_per_s"] / best["window"]["output_tok_per_s"]
            for r in runs if r is not best}


def _names(text: str) -> list[str]:
    return [n for n in text.split(",") if n]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--pair", type=_names, help="baseline,configuration[,...]: each in turn, same "
                       "workload and window; one JSON with each ratio over the first. Names: " + ", ".join(CONFIGS))
    which.add_argument("--config", type=_names, help="one configuration")
    which.add_argument("--merge", nargs="+", metavar="JSON",
                       help="join the runs of earlier --config/--pair results (same workload and settings, "
                            "run one after the other on one machine) into one report with ratios; runs nothing")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--mode", default="steady-state", help="steady-state or decode-fill")
    ap.add_argument("--shape", default="qwen3-8b", help="sparsespec_sglang.testing.model_dirs shape")
    ap.add_argument("--num-requests", type=int, default=2048, help="fresh requests (>= 512)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fixed-output-len", type=int, default=None,
                    help="every request generates this many tokens (default: N(13185, 7626) in [1024, 32768])")
    ap.add_argument("--prompts", default=None, help="JSONL of real prompts (else random ids, 124-148 tokens)")
    ap.add_argument("--temperature", type=float, default=wl.PAPER_TEMPERATURE)
    ap.add_argument("--k", type=int, default=8, help="draft steps (NGRAM: k+1 draft tokens)")
    ap.add_argument("--forced-accept", type=float, default=7.0,
                    help="speculative servers only: SGLANG_SIMULATE_ACC_LEN, accepted tokens per cycle "
                         "incl. the bonus, in [1, k+1] (7 = 6 of 8 drafts; the paper measured 6.16)")
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--max-concurrency", type=int, default=512,
                    help="requests in flight from the client (bench_serving's semaphore, FIFO): keeps a "
                         "queue at the server without thousands of open connections")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=160,
                    help="largest decode CUDA-graph batch (a saturated 8B-shape H200 pool holds ~80-110 "
                         "requests of the paper's workload; larger batches decode without graphs)")
    ap.add_argument("--mem-fraction", type=float, default=0.85, help="--mem-fraction-static")
    ap.add_argument("--hicache-size", type=int, default=48,
                    help="host KV pool (GB) of configurations with --enable-hierarchical-cache")
    ap.add_argument("--prefill-cuda-graph", dest="disable_prefill_cuda_graph", action="store_false",
                    help="capture prefill CUDA graphs too (slower startup; off by default)")
    ap.add_argument("--decode-log-interval", type=int, default=20, help="decode steps per gauge update")
    ap.add_argument("--log-level", default="info")
    ap.add_argument("--window", type=float, default=60.0, help="measurement window (s)")
    ap.add_argument("--poll", type=float, default=2.0, help="seconds between /metrics scrapes")
    ap.add_argument("--saturation-usage", type=float, default=0.85, help="sglang:token_usage that counts as full")
    ap.add_argument("--stable-s", type=float, default=10.0, help="the batch must hold this long (s)")
    ap.add_argument("--stable-tolerance", type=float, default=0.1,
                    help="largest move of the running batch within --stable-s, as a fraction")
    ap.add_argument("--saturation-timeout", type=float, default=150.0,
                    help="measure anyway after this long (s), marked saturated=false")
    ap.add_argument("--startup-timeout", type=float, default=420.0)
    ap.add_argument("--mid-run-fill", type=float, default=1.0,
                    help="steady-state: mid-run requests whose contexts add up to this many pools")
    ap.add_argument("--server-args", default="",
                    help='extra launch_server flags, one quoted string: --server-args="--disable-radix-cache"')
    args = ap.parse_args(argv)
    if args.merge is not None:
        args.names = []
        return args
    names = args.pair or args.config
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        ap.error(f"--pair/--config: unknown {', '.join(bad)}; allowed: {', '.join(CONFIGS)}")
    if args.pair is not None and len(args.pair) < 2:
        ap.error(f"--pair takes two or more names, baseline,configuration[,...] (got {len(args.pair)})")
    if args.config is not None and len(args.config) != 1:
        ap.error("--config takes one name (use --pair for two)")
    if args.mode not in MODES:
        ap.error(f"--mode must be one of: {', '.join(MODES)} (got {args.mode!r})")
    if args.num_requests < 512:
        ap.error("--num-requests must be >= 512, the saturated queue must outlast the window "
                 f"(got {args.num_requests})")
    if not 1 <= args.forced_accept <= args.k + 1:
        ap.error(f"--forced-accept must be in [1, k+1 = {args.k + 1}] (got {args.forced_accept})")
    if args.fixed_output_len is not None and args.fixed_output_len < 1:
        ap.error(f"--fixed-output-len must be >= 1 (got {args.fixed_output_len})")
    if args.max_concurrency <= args.max_running_requests:
        ap.error(f"--max-concurrency must exceed --max-running-requests={args.max_running_requests} "
                 f"(a saturated server needs a queue; got {args.max_concurrency})")
    for flag, value in (("--window", args.window), ("--poll", args.poll), ("--mid-run-fill", args.mid_run_fill)):
        if value <= 0:
            ap.error(f"{flag} must be > 0 (got {value})")
    import shlex

    args.server_args = shlex.split(args.server_args)
    args.names = names
    return args


def merge(paths: Sequence[str]) -> dict:
    """One report from the runs of several result files, in order (the first run is the baseline).
    Their workload and settings must agree: a ratio between different workloads means nothing."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    for path, r in zip(paths[1:], reports[1:]):
        for key in ("mode", "shape", "workload", "settings", "gpu"):
            if r.get(key) != first.get(key):
                raise SystemExit(f"--merge: {path} differs from {paths[0]} in {key!r}; only runs of one "
                                 "workload, settings and GPU can be compared")
    report = {k: v for k, v in first.items() if k not in ("runs", "ratio", "ratio_over_fastest_plain", "command")}
    report["commands"] = [r["command"] for r in reports]
    report["commits"] = [r["commit"] for r in reports]
    report["merged_from"] = [str(p) for p in paths]
    report["same_process"] = False  # each file is its own process, one after the other
    report["runs"] = [run for r in reports for run in r["runs"]]
    report["forced_acceptance"] = {r["config"]: r.get("forced_accept") for r in report["runs"]}
    add_ratios(report)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.merge is not None:
        report = merge(args.merge)
        Path(args.out).write_text(json.dumps(report, indent=1))
        for key, value in report.get("ratio", {}).items():
            print(f"[{report['mode']}] window throughput {key}: {value:.3f}x (consecutive processes)", flush=True)
        return 1 if any("error" in r for r in report["runs"]) else 0
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    work = Path(tempfile.mkdtemp(prefix="bench_saturated_"))
    model_dir = str(make_model_dir(work / args.shape, args.shape, with_weights=False, dtype="bfloat16"))
    args.vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = None
    if args.prompts:
        from transformers import AutoTokenizer

        prompts = wl.text_prompts(Path(args.prompts), AutoTokenizer.from_pretrained(model_dir), args.num_requests)
    fresh = wl.make_workload(args.num_requests, seed=args.seed, vocab_size=args.vocab_size,
                             fixed_output_len=args.fixed_output_len, prompts=prompts)
    report = {
        "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
        "mode": args.mode, "commit": provenance.commit(), "gpu": gpu_name(), "machine": platform.node(),
        "versions": versions(), "shape": args.shape,
        "workload": {"seed": args.seed, "prompts": args.prompts, "fixed_output_len": args.fixed_output_len,
                     "temperature": args.temperature, "ignore_eos": True, **wl.summary(fresh)},
        "settings": {k: getattr(args, k) for k in (
            "k", "forced_accept", "max_running_requests", "max_concurrency", "cuda_graph_max_bs", "mem_fraction",
            "hicache_size", "disable_prefill_cuda_graph", "decode_log_interval", "window", "poll", "saturation_usage",
            "stable_s", "stable_tolerance", "saturation_timeout", "mid_run_fill", "server_args")},
        "work_dir": str(work), "runs": [],
    }
    print(f"[{args.mode}] workload {json.dumps(report['workload'])}", flush=True)
    out = Path(args.out)
    status = 0
    # A SIGTERM (e.g. `timeout`) unwinds through run_one's `finally`, which stops the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    for name in args.names:
        try:
            report["runs"].append(run_one(name, model_dir, fresh, args, work))
        except Exception as e:  # keep the other run of a pair and write what was measured
            print(f"[{name}] FAILED: {e}", flush=True)
            report["runs"].append({"config": name, "error": str(e)})
        status = 1 if any("error" in r for r in report["runs"]) else 0
        report["forced_acceptance"] = {r["config"]: r.get("forced_accept") for r in report["runs"]}
        add_ratios(report)
        out.write_text(json.dumps(report, indent=1))
    for key, value in report.get("ratio", {}).items():
        print(f"[{args.mode}] window throughput {key}: {value:.3f}x", flush=True)
    print(f"wrote {out}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
