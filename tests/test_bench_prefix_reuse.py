"""scripts/bench_prefix_reuse.py's CPU parts: argument refusals, the commands it builds, the cache hit
rate from canned /metrics scrapes and a canned bench_serving result, the ratios over the faster plain."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_prefix_reuse as bp  # noqa: E402
import bench_saturated as bs  # noqa: E402

SCRIPT = ROOT / "scripts" / "bench_prefix_reuse.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, needle", [
    (["--configs", "plain,eagle"], "--configs: unknown eagle; allowed: plain, plain-flashinfer, sparsespec"),
    (["--configs", "plain,plain"], "--configs: a configuration is named twice"),
    (["--shape", "qwen9"], "--shape: unknown qwen9; allowed: tiny, small, qwen3-1.7b, qwen3-8b, qwen3-14b"),
    (["--model-path", "/nonexistent"], "--model-path: no config.json in /nonexistent"),
    (["--model-path", "/tmp", "--shape", "tiny"], "argument --shape: not allowed with argument --model-path"),
    (["--forced-accept", "10"], "--forced-accept: a number in [1, 9]"),
    (["--forced-accept", "x"], "--forced-accept: a number in [1, 9]"),
    (["--gsp-num-groups", "0"], "--gsp-num-groups: a positive integer (got '0')"),
    (["--gsp-output-len", "many"], "--gsp-output-len: a positive integer (got 'many')"),
    (["--max-running-requests", "-1"], "--max-running-requests: a positive integer"),
    (["--mem-fraction", "1.5"], "--mem-fraction: a fraction in (0, 1)"),
])
def test_bad_arguments_are_refused_in_one_line_before_any_server(extra, needle, tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"), *extra)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_commands_use_sglangs_bench_serving_dataset_and_the_same_server_settings(tmp_path):
    args = bp.parse_args(["--out", "x.json", "--gsp-num-groups", "8", "--gsp-prompts-per-group", "4",
                          "--gsp-system-prompt-len", "1024", "--gsp-question-len", "64", "--gsp-output-len", "32",
                          "--max-running-requests", "16", "--server-args=--tp 2"])
    bench = bp.bench_args("http://127.0.0.1:5", args, tmp_path / "r.jsonl")
    assert "--cache-report" in bench
    rest = [a for a in bench if a != "--cache-report"]
    flags = dict(zip(rest[::2], rest[1::2]))
    assert flags == {"--backend": "sglang", "--base-url": "http://127.0.0.1:5",
                     "--dataset-name": "generated-shared-prefix", "--num-prompts": "32", "--gsp-num-groups": "8",
                     "--gsp-prompts-per-group": "4", "--gsp-system-prompt-len": "1024", "--gsp-question-len": "64",
                     "--gsp-output-len": "32", "--seed": "42", "--output-file": str(tmp_path / "r.jsonl")}
    plain = bp.server_command("/m", True, 7, bp.CONFIGS["plain"], args)
    spec = bp.server_command("/m", True, 7, bp.CONFIGS["sparsespec"], args)
    assert plain[plain.index("--attention-backend") + 1] == "triton"
    assert spec[spec.index("--speculative-algorithm") + 1] == "SPARSESPEC"
    for cmd in (plain, spec):
        assert cmd[1:3] == ["-m", "sglang.launch_server"] and "--enable-metrics" in cmd
        assert cmd[cmd.index("--max-running-requests") + 1] == cmd[cmd.index("--cuda-graph-max-bs-decode") + 1] == "16"
        assert cmd[cmd.index("--load-format") + 1] == "dummy" and cmd[-2:] == ["--tp", "2"]
    assert "--load-format" not in bp.server_command("/m", False, 7, bp.CONFIGS["plain"], args)


def test_bench_serving_is_reached_through_compat_and_knows_the_dataset_flags():
    """The ``tool`` subcommand runs the bench_serving module compat resolves, with its own parser."""
    proc = _run("tool", "--", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--gsp-num-groups", "--gsp-prompts-per-group", "--gsp-system-prompt-len", "--gsp-question-len",
                 "--gsp-output-len", "--cache-report", "--output-file"):
        assert flag in proc.stdout


def test_forced_acceptance_goes_to_speculative_servers_only_and_is_never_inherited():
    base = {"PATH": "/bin", bp.FORCED_ACCEPT_ENV: "5"}
    env, forced = bp.bs.server_env(bp.CONFIGS["sparsespec"], None, base)
    assert forced is None and bp.FORCED_ACCEPT_ENV not in env
    env, forced = bp.bs.server_env(bp.CONFIGS["plain"], 7.0, base)
    assert forced is None and bp.FORCED_ACCEPT_ENV not in env
    env, forced = bp.bs.server_env(bp.CONFIGS["sparsespec"], 7.0, base)
    assert forced == 7.0 and env[bp.FORCED_ACCEPT_ENV] == "7.0"


def _metrics(prompt: float, device: float | None, host: float = 0.0, requests: float = 0.0, gauge: float = 0.0) -> str:
    """/metrics text as SGLang 0.5.17 writes it (two is_streaming series; cached tokens by source)."""
    labels = 'engine_type="unified",model_name="m",tp_rank="0",pp_rank="0"'
    lines = ["# HELP sglang:prompt_tokens_total Number of prefill tokens processed.",
             "# TYPE sglang:prompt_tokens_total counter",
             f'sglang:prompt_tokens_total{{{labels},is_streaming="false"}} {prompt - 100}',
             f'sglang:prompt_tokens_total{{{labels},is_streaming="true"}} 100.0',
             "# HELP sglang:num_requests_total Number of requests processed.",
             "# TYPE sglang:num_requests_total counter",
             f'sglang:num_requests_total{{{labels},is_streaming="false"}} {requests}',
             "# HELP sglang:cache_hit_rate The prefix cache hit rate.",
             "# TYPE sglang:cache_hit_rate gauge",
             f"sglang:cache_hit_rate{{{labels}}} {gauge}"]
    if device is not None:  # the series appears at the first cache hit
        lines += ["# HELP sglang:cached_tokens_total Number of cached prompt tokens by source (device/host/storage).",
                  "# TYPE sglang:cached_tokens_total counter",
                  f'sglang:cached_tokens_total{{{labels},cache_source="device"}} {device}',
                  f'sglang:cached_tokens_total{{{labels},cache_source="host"}} {host}']
    return "\n".join(lines) + "\n"


def test_cache_hit_rate_from_two_scrapes():
    before = bs.parse_metrics(_metrics(prompt=1000, device=None, requests=2), t=0.0)
    after = bs.parse_metrics(_metrics(prompt=11000, device=8000, host=500, requests=34, gauge=0.91), t=60.0)
    counts = bp.cache_counts(before, after)
    assert counts.prompt_tokens == 10000 and counts.cached_tokens == 8500
    assert counts.cached_by_source == {"device": 8000, "host": 500} and counts.requests == 32
    assert counts.hit_rate == pytest.approx(0.85)
    again = bp.cache_counts(after, bs.parse_metrics(_metrics(prompt=12000, device=8900, host=500), t=90.0))
    assert again.hit_rate == pytest.approx(0.9) and again.cached_by_source == {"device": 900, "host": 0}
    none = bp.cache_counts(before, bs.parse_metrics(_metrics(prompt=1000, device=None), t=1.0))
    assert none.hit_rate is None and none.cached_tokens == 0  # no finished request: no rate, not 0
    with pytest.raises(ValueError, match="is --enable-metrics on"):
        bp.cache_counts(before, bs.parse_metrics("# nothing\n", t=2.0))


# One line of bench_serving's --output-file (SGLang 0.5.17, --cache-report), trimmed.
BENCH_LINE = {"backend": "sglang", "dataset_name": "generated-shared-prefix", "duration": 40.0, "completed": 1024,
              "total_input_tokens": 2228224, "total_output_tokens": 262144, "request_throughput": 25.6,
              "input_throughput": 55705.6, "output_throughput": 6553.6, "total_throughput": 62259.2,
              "mean_ttft_ms": 900.0, "median_ttft_ms": 800.0, "mean_e2e_latency_ms": 20000.0, "accept_length": None,
              "cache_report": {"total_prompt_tokens": 2228224, "total_cached_tokens": 1949696,
                               "cache_hit_rate_pct": 87.5, "device_cached_tokens": 1949696, "host_cached_tokens": 0,
                               "storage_cached_tokens": None, "storage_backend": None}}


def test_bench_result_is_the_last_line_of_its_output_file(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({**BENCH_LINE, "output_throughput": 1.0}) + "\n" + json.dumps(BENCH_LINE) + "\n\n")
    assert bp.parse_result_file(path) == BENCH_LINE
    assert bp.parse_result_file(tmp_path / "missing.jsonl") is None
    counts = bp.CacheCounts(prompt_tokens=2228480, cached_tokens=1949696, cached_by_source={"device": 1949696},
                            requests=1025, generation_tokens=262400)
    numbers = bp.run_numbers(BENCH_LINE, counts, 0.93)
    assert numbers["output_tok_per_s"] == 6553.6 and numbers["request_throughput"] == 25.6
    assert numbers["bench_cache_hit_rate"] == pytest.approx(0.875)
    assert numbers["metrics_cache_hit_rate"] == pytest.approx(1949696 / 2228480)
    assert numbers["metrics"]["cache_hit_rate_gauge_last"] == 0.93 and numbers["bench_serving"]["completed"] == 1024


def _run_record(config: str, tps: float, rps: float, hit: float) -> dict:
    return {"config": config, "output_tok_per_s": tps, "request_throughput": rps, "metrics_cache_hit_rate": hit,
            "bench_cache_hit_rate": hit - 0.01}


def test_ratios_are_over_the_faster_plain():
    report = {"runs": [_run_record("plain", 5000.0, 20.0, 0.88), _run_record("plain-flashinfer", 6000.0, 24.0, 0.87),
                       _run_record("sparsespec", 9000.0, 30.0, 0.875)]}
    bp.add_ratios(report)
    entry = report["over_fastest_plain"]["sparsespec/plain-flashinfer"]
    assert entry["baseline"] == "plain-flashinfer"
    assert entry["output_tok_per_s"] == pytest.approx(1.5) and entry["request_throughput"] == pytest.approx(1.25)
    assert entry["metrics_cache_hit_rate"] == {"run": 0.875, "baseline": 0.87}
    # A failed plain run is no baseline; with no plain run there is no ratio.
    report["runs"][1] = {"config": "plain-flashinfer", "error": "boom"}
    bp.add_ratios(report)
    assert list(report["over_fastest_plain"]) == ["sparsespec/plain"]
    assert report["over_fastest_plain"]["sparsespec/plain"]["output_tok_per_s"] == pytest.approx(1.8)
    report["runs"] = [_run_record("sparsespec", 9000.0, 30.0, 0.875)]
    bp.add_ratios(report)
    assert "over_fastest_plain" not in report
