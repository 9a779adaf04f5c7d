"""scripts/workload.py and scripts/bench_saturated.py on CPU: the paper's workload, the
steady-state (mid-run) shape, /metrics parsing in SGLang's format, saturation detection,
the window arithmetic, the replay through bench_serving (against a scripted HTTP server), the
launch commands (parsed by SGLang's own parser) and the result JSON."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import bench_saturated as bs  # noqa: E402
import workload as wl  # noqa: E402

# ---------------------------------------------------------------- the workload


def test_workload_is_seeded():
    a, b = wl.make_workload(600, seed=3), wl.make_workload(600, seed=3)
    assert a == b
    c = wl.make_workload(600, seed=4)
    assert [r.output_len for r in a] != [r.output_len for r in c]
    assert [r.input_ids for r in a] != [r.input_ids for r in c]


def test_prompts_are_paper_length_random_ids():
    reqs = wl.make_workload(2048, seed=0, vocab_size=151936)
    lens = np.array([r.prompt_len for r in reqs])
    assert lens.min() == 124 and lens.max() == 148  # uniform in [124, 148], both ends drawn at N=2048
    assert abs(lens.mean() - 136) < 1
    ids = np.concatenate([r.input_ids for r in reqs])
    assert ids.min() >= wl.RANDOM_ID_MARGIN and ids.max() < 151936 - wl.RANDOM_ID_MARGIN
    assert all(r.kind == "fresh" and r.done == 0 for r in reqs)


def _clipped_normal_moments(mean, std, lo, hi):
    """Mean and std of clip(N(mean, std), lo, hi), from scipy's normal distribution."""
    n = stats.norm(mean, std)
    a, b = n.cdf(lo), n.cdf(hi)
    tn = stats.truncnorm((lo - mean) / std, (hi - mean) / std, loc=mean, scale=std)
    m1 = a * lo + (b - a) * tn.mean() + (1 - b) * hi
    m2 = a * lo ** 2 + (b - a) * (tn.var() + tn.mean() ** 2) + (1 - b) * hi ** 2
    return m1, (m2 - m1 ** 2) ** 0.5


def test_output_lengths_follow_the_clipped_paper_distribution():
    outs = np.array([r.output_len for r in wl.make_workload(2048, seed=0)])
    assert outs.min() == 1024 and outs.max() <= 32768  # ~5% fall below 1K and are clipped up
    assert (outs == 1024).mean() == pytest.approx(stats.norm(13185, 7626).cdf(1024), abs=0.015)
    mean, std = _clipped_normal_moments(13185, 7626, 1024, 32768)
    assert abs(outs.mean() - mean) < 4 * std / 2048 ** 0.5
    assert outs.std() == pytest.approx(std, rel=0.06)
    # Near the paper's 13,185 +/- 7,626 (clipping lifts the mean ~1%, trims the std ~5%).
    assert outs.mean() == pytest.approx(13185, rel=0.04) and outs.std() == pytest.approx(7626, rel=0.1)


def test_clip_bounds_hold_at_both_ends():
    outs = wl.output_lengths(5000, np.random.default_rng(0), mean=16000, std=30000)
    assert outs.min() == 1024 and outs.max() == 32768


def test_fixed_output_length():
    reqs = wl.make_workload(512, seed=1, fixed_output_len=4096)
    assert {r.output_len for r in reqs} == {4096}


def test_real_prompts_are_tokenised_and_cycled(tmp_path):
    from sparsespec_sglang.testing.model_dirs import make_model_dir
    from transformers import AutoTokenizer

    model = make_model_dir(tmp_path / "tiny", "tiny", with_weights=False)
    tok = AutoTokenizer.from_pretrained(model)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "Find x."}) + "\n\n" + json.dumps({"question": "2+2?"}) + "\n")
    ids = wl.text_prompts(f, tok, 5)
    assert len(ids) == 5 and ids[0] == ids[2] == ids[4] and ids[1] == ids[3] and ids[0] != ids[1]
    assert "Find x." in tok.decode(ids[0]) and "assistant" in tok.decode(ids[0])  # chat-templated
    (tmp_path / "bad.jsonl").write_text(json.dumps({"x": 1}) + "\n")
    with pytest.raises(ValueError, match="none of the keys"):
        wl.text_prompts(tmp_path / "bad.jsonl", tok, 1)


# ---------------------------------------------------------------- the steady-state shape


def test_mid_run_requests_sit_at_a_uniform_fraction_of_a_length_biased_output():
    # The paper's shape scaled down 100x in output length (the filler ids stay small).
    fresh = wl.make_workload(2048, seed=0, output_mean=131.85, output_std=76.26, output_clip=(10, 328))
    mid = wl.mid_run(fresh, 3000, seed=0)
    full = np.array([r.full_output_len for r in mid], dtype=float)
    done = np.array([r.done for r in mid], dtype=float)
    assert all(r.kind == "mid-run" and r.output_len >= 1 and r.output_len + r.done == r.full_output_len
               for r in mid)
    assert {r.prompt_len - r.done for r in mid} <= set(range(124, 149)) and done.max() > 200
    # Uniform fraction: done / full ~ U(0, 1).
    assert stats.kstest(done / full, "uniform").pvalue > 1e-3
    # Length-biased pick: E[full] = E[o^2] / E[o] (~1.3x the plain mean), not the plain mean.
    o = np.array([r.output_len for r in fresh], dtype=float)
    assert full.mean() == pytest.approx((o ** 2).mean() / o.mean(), rel=0.03)
    assert full.mean() > 1.2 * o.mean()
    # The pool-sizing estimate matches what the list holds.
    ctx = np.array([r.prompt_len for r in mid], dtype=float)
    assert ctx.mean() == pytest.approx(wl.mid_run_mean_context(fresh), rel=0.03)
    # (with the paper's lengths the estimate is ~8.9K tokens: prompt + E[o^2] / (2 E[o]))
    assert 8500 < wl.mid_run_mean_context(wl.make_workload(2048, seed=0)) < 9300


def test_a_running_batch_of_the_paper_workload_holds_contexts_of_very_unequal_length():
    """The longest of 40 running requests holds ~2.8x the batch's mean context (the account's
    case for splitting KV work by length); equal output lengths give less skew, one request none."""
    paper = wl.make_workload(2048, seed=0)
    skew = wl.batch_context_skew(paper, 40)
    assert 8500 < skew["mean_context"] < 9300
    assert 2.3 < skew["max_over_mean"]["median"] < 3.3
    assert skew["max_over_mean"]["p10"] < skew["max_over_mean"]["median"] < skew["max_over_mean"]["p90"]
    fixed = wl.batch_context_skew(wl.make_workload(2048, seed=0, fixed_output_len=13185), 40)
    assert 1.5 < fixed["max_over_mean"]["median"] < skew["max_over_mean"]["median"]
    assert wl.batch_context_skew(paper, 1)["max_over_mean"] == {"p10": 1.0, "median": 1.0, "p90": 1.0}


def test_mid_run_prompts_extend_the_picked_requests_prompt():
    fresh = wl.make_workload(600, seed=2)
    prompts = {tuple(r.input_ids) for r in fresh}
    for r in wl.mid_run(fresh, 50, seed=2):
        assert tuple(r.input_ids[: r.prompt_len - r.done]) in prompts


def test_mid_run_lists_are_prefixes_of_each_other():
    fresh = wl.make_workload(600, seed=0)
    assert wl.mid_run(fresh, 40, seed=0) == wl.mid_run(fresh, 90, seed=0)[:40]
    assert wl.mid_run(fresh, 40, seed=0) != wl.mid_run(fresh, 40, seed=1)


def test_steady_state_puts_mid_run_requests_first_then_the_fresh_workload():
    fresh = wl.make_workload(600, seed=0)
    reqs = wl.steady_state(fresh, 30, seed=0)
    assert [r.kind for r in reqs] == ["mid-run"] * 30 + ["fresh"] * 600 and reqs[30:] == fresh
    assert wl.summary(reqs)["num_mid_run"] == 30


def test_num_mid_run_fills_the_pool():
    fresh = wl.make_workload(2048, seed=0)
    n = bs.num_mid_run(700_000, fresh, 1.0)
    assert n == pytest.approx(700_000 / wl.mid_run_mean_context(fresh), abs=1)
    assert 60 < n < 100  # ~8.9K-token contexts
    assert bs.num_mid_run(10**9, fresh, 1.0) == len(fresh)


def test_workload_file_round_trip_and_cli(tmp_path):
    reqs = wl.steady_state(wl.make_workload(512, seed=0), 3)
    wl.write_jsonl(reqs, tmp_path / "w.jsonl")
    assert wl.read_jsonl(tmp_path / "w.jsonl") == reqs
    assert wl.main(["generate", "--out", str(tmp_path / "c.jsonl"), "--num-requests", "512", "--mid-run", "3"]) == 0
    assert wl.read_jsonl(tmp_path / "c.jsonl") == reqs


def test_openai_dataset_export_carries_exact_output_lengths(tmp_path):
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model = make_model_dir(tmp_path / "tiny", "tiny", with_weights=False)
    out = tmp_path / "o.jsonl"
    assert wl.main(["generate", "--out", str(out), "--num-requests", "600", "--model-dir", str(model),
                    "--format", "openai"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = wl.make_workload(600, seed=0, vocab_size=512)
    assert [r["max_tokens"] for r in rows] == [r.output_len for r in expected]
    assert all(r["ignore_eos"] is True and r["messages"][0]["role"] == "user" for r in rows)


# ---------------------------------------------------------------- /metrics in SGLang's format

# Lines of a real SPARSESPEC server's /metrics (H100, sglang 0.5.17; benchmarks/results/entrypoints_h100.json);
# metrics_text() writes the scheduler series this script reads in the same label layout.
LABELS = 'engine_type="unified",model_name="/tmp/m",moe_ep_rank="0",pp_rank="0",tp_rank="0"'
REAL_LINES = [
    'sglang:spec_verify_calls_total{engine_type="unified",model_name="/tmp/tmp60o6a3a2/small"} 1456.0',
    'sglang:spec_accept_length{engine_type="unified",model_name="/tmp/tmp60o6a3a2/small",moe_ep_rank="0",'
    'pp_rank="0",tp_rank="0"} 1.025',
    'sparsespec:verify_gpu_ms_per_cycle{model_name="/tmp/tmp60o6a3a2/small"} 0.5839100008687148',
]


def metrics_text(*, decode: float, prefill: float = 0.0, running: float = 0, queued: float = 0,
                 usage: float = 0.0, retracted: float = 0.0, accept: float = 7.0, gen: float = 0.0,
                 seq_lens: float = 0.0) -> str:
    lines = [
        "# HELP sglang:realtime_tokens_total Total number of tokens processed (updated on each log interval).",
        "# TYPE sglang:realtime_tokens_total counter",
        f'sglang:realtime_tokens_total{{{LABELS},mode="decode"}} {decode}',
        f'sglang:realtime_tokens_total{{{LABELS},mode="prefill_compute"}} {prefill}',
        "# TYPE sglang:num_running_reqs gauge", f"sglang:num_running_reqs{{{LABELS}}} {running}",
        "# TYPE sglang:num_queue_reqs gauge", f"sglang:num_queue_reqs{{{LABELS}}} {queued}",
        "# TYPE sglang:token_usage gauge", f"sglang:token_usage{{{LABELS}}} {usage}",
        "# TYPE sglang:gen_throughput gauge", f"sglang:gen_throughput{{{LABELS}}} {gen}",
        "# TYPE sglang:decode_sum_seq_lens gauge", f"sglang:decode_sum_seq_lens{{{LABELS}}} {seq_lens}",
        "# TYPE sglang:spec_accept_length gauge", f"sglang:spec_accept_length{{{LABELS}}} {accept}",
        "# TYPE sglang:num_retracted_requests_total counter",
        f"sglang:num_retracted_requests_total{{{LABELS}}} {retracted}",
    ]
    return "\n".join(lines + [REAL_LINES[2]]) + "\n"  # + the real sparsespec:* gauge line


def test_parse_real_sglang_metrics_lines():
    s = bs.parse_metrics("\n".join(REAL_LINES) + "\n", t=1.0)
    assert s.counter("sglang:spec_verify_calls_total") == 1456.0
    assert s.gauge("sglang:spec_accept_length") == 1.025
    assert s.names("sparsespec:") == ["sparsespec:verify_gpu_ms_per_cycle"]
    assert s.gauge("sglang:num_running_reqs") is None


# Runs in its own process: SGLang's collector registers on prometheus_client's global registry.
REAL_COLLECTOR = """
import os, sys, tempfile
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp()  # as a server with --enable-metrics
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from sglang.srt.observability.metrics_collector import QueueCount, SchedulerMetricsCollector, SchedulerStats
from sglang.srt.runtime_context import get_context

# SGLang's own test override publishes a default ServerArgs (without loading a model config): the
# collector reads it as its argument and, from 0.5.19 on, through the published config.
with get_context().override_server_args() as server_args:
    c = SchedulerMetricsCollector(labels={"model_name": "m", "engine_type": "unified", "tp_rank": "0",
                                          "pp_rank": "0", "moe_ep_rank": "0"}, server_args=server_args)
    c.log_stats(SchedulerStats(num_running_reqs=QueueCount(total=80), num_queue_reqs=QueueCount(total=500),
                               token_usage=0.93, gen_throughput=4100.0, spec_accept_length=7.0,
                               decode_sum_seq_lens=712000))
    c.increment_realtime_tokens(None, decode_tokens=12345)
    c.increment_realtime_tokens(None, prefill_compute_tokens=999)
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry)  # what a server's /metrics serves
sys.stdout.write(generate_latest(registry).decode())
"""


def test_parse_what_sglangs_own_collector_exports():
    import subprocess

    out = subprocess.run([sys.executable, "-c", REAL_COLLECTOR], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    a, b = bs.parse_metrics(out, t=0.0), bs.parse_metrics(out.replace("12345.0", "72345.0"), t=20.0)
    w = bs.window_stats(a, b, [a, b])
    assert w["output_tokens"] == 60000 and w["output_tok_per_s"] == 3000.0 and w["prefill_tokens"] == 0
    assert w["running_requests"]["mean"] == 80 and w["queued_requests"]["mean"] == 500
    assert w["token_usage"]["mean"] == 0.93 and w["sglang_gen_throughput"]["mean"] == 4100.0
    assert w["spec_accept_length"]["mean"] == 7.0 and w["retracted_requests"] == 0.0
    assert w["context_tokens_per_running_request"]["mean"] == 8900.0
    assert b.counter(bs.DECODE_COUNTER, mode="prefill_compute") == 999
    assert bs.Saturation(stable_s=20).holds([a, b])


def test_metric_names_are_sglangs():
    """The series this script reads exist, with these names and labels, in SGLang's collector."""
    from importlib.util import find_spec

    root = Path(find_spec("sglang").submodule_search_locations[0])  # without importing sglang
    src = (root / "srt" / "observability" / "metrics_collector.py").read_text()
    for name in ("sglang:realtime_tokens_total", "sglang:num_running_reqs", "sglang:num_queue_reqs",
                 "sglang:token_usage", "sglang:gen_throughput", "sglang:spec_accept_length",
                 "sglang:num_retracted_requests_total", "sglang:generation_tokens_total",
                 "sglang:max_total_num_tokens"):
        assert f'name="{name}"' in src, name
    assert re.search(r'\("decode", decode_tokens\)', src)  # the mode label of the per-step counter


def test_counter_sums_ranks_and_filters_labels_gauge_averages_ranks():
    text = metrics_text(decode=100, prefill=50, running=10, usage=0.5)
    rank1 = LABELS.replace('tp_rank="0"', 'tp_rank="1"')
    text += f'sglang:realtime_tokens_total{{{rank1},mode="decode"}} 30\n'
    text += f"sglang:token_usage{{{rank1}}} 0.7\n"
    s = bs.parse_metrics(text, t=0.0)
    assert s.counter(bs.DECODE_COUNTER, mode="decode") == 130
    assert s.counter(bs.DECODE_COUNTER, mode="prefill_compute") == 50
    assert s.gauge("sglang:token_usage") == pytest.approx(0.6)


# ---------------------------------------------------------------- window arithmetic


def _scrape(t: float, **kw) -> bs.Scrape:
    return bs.parse_metrics(metrics_text(**kw), t=t)


def test_window_throughput_is_the_decode_counter_growth_over_the_window():
    start = _scrape(100.0, decode=1_000_000, prefill=5000, retracted=3, running=80, usage=0.9, queued=500,
                    seq_lens=80 * 9000)
    mid = _scrape(130.0, decode=1_150_000, prefill=5000, retracted=4, running=82, usage=0.95, queued=499,
                  seq_lens=82 * 9100)
    end = _scrape(160.0, decode=1_300_000, prefill=9000, retracted=7, running=84, usage=0.97, queued=498,
                  seq_lens=84 * 9200)
    before = _scrape(50.0, decode=0, running=1, usage=0.1, queued=0)  # outside the window: ignored
    w = bs.window_stats(start, end, [before, start, mid, end])
    assert w["seconds"] == 60.0 and w["output_tokens"] == 300_000
    assert w["output_tok_per_s"] == pytest.approx(5000.0)
    assert w["prefill_tokens"] == 4000 and w["retracted_requests"] == 4
    assert w["running_requests"] == {"mean": 82.0, "min": 80.0, "max": 84.0}
    assert w["token_usage"]["mean"] == pytest.approx(0.94) and w["num_scrapes"] == 3
    assert w["spec_accept_length"]["mean"] == 7.0
    assert w["context_tokens_per_running_request"] == pytest.approx({"mean": 9100.0, "min": 9000.0, "max": 9200.0})
    assert w["sparsespec:verify_gpu_ms_per_cycle"]["mean"] == pytest.approx(0.58391, rel=1e-4)


def test_window_needs_the_decode_counter_and_a_positive_span():
    a = bs.parse_metrics("\n".join(REAL_LINES) + "\n", t=0.0)
    b = bs.parse_metrics("\n".join(REAL_LINES) + "\n", t=1.0)
    with pytest.raises(ValueError, match="enable-metrics"):
        bs.window_stats(a, b, [a, b])
    with pytest.raises(ValueError, match="not after"):
        bs.window_stats(_scrape(5.0, decode=1), _scrape(5.0, decode=2), [])


# ---------------------------------------------------------------- saturation detection


def _series(points):
    return [_scrape(float(t), decode=0, running=r, queued=q, usage=u) for t, r, q, u in points]


def test_saturation_waits_for_a_full_pool_a_queue_and_a_stable_batch():
    rule = bs.Saturation(usage=0.85, stable_s=10, tolerance=0.1)
    pts = [(0, 10, 900, 0.2), (2, 40, 870, 0.5), (4, 70, 840, 0.8),  # prefill ramp
           (6, 78, 830, 0.9), (8, 80, 828, 0.93), (10, 79, 828, 0.95),
           (12, 81, 827, 0.96), (14, 80, 826, 0.97), (16, 80, 826, 0.97)]
    # First time the last 10 s are all full, queued, and within 10%: t=16 (window 6..16).
    assert bs.first_saturated(_series(pts), rule) == 16.0
    # A client that is the limit (empty queue) never saturates the server.
    assert bs.first_saturated(_series([(t, r, 0, u) for t, r, q, u in pts]), rule) is None
    # Pool below the threshold: not saturated.
    assert bs.first_saturated(_series([(t, r, q, min(u, 0.8)) for t, r, q, u in pts]), rule) is None
    # A batch still moving by more than the tolerance: not yet.
    moving = pts[:6] + [(12, 95, 800, 0.96), (14, 80, 800, 0.97), (16, 80, 800, 0.97)]
    assert bs.first_saturated(_series(moving), rule) is None
    # Too short a history: never before stable_s has passed.
    assert not rule.holds(_series([(0, 80, 10, 0.97), (5, 80, 10, 0.97)]))


def test_a_full_batch_counts_as_saturated_without_a_full_pool():
    pts = [(t, 256, 1500, 0.3) for t in range(0, 14, 2)]
    assert bs.first_saturated(_series(pts), bs.Saturation(max_running=256)) == 10.0
    assert bs.first_saturated(_series(pts), bs.Saturation(max_running=None)) is None


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.now += s


def test_measure_waits_then_measures_the_window():
    clock = FakeClock()

    def get(_url):  # ramp for 10 s, then saturated at 80 running, 4000 tok/s
        t = clock.now
        return _scrape(t, decode=4000 * t, running=min(80, 8 * t + 1), queued=500,
                       usage=min(0.97, 0.1 * t), gen=4000)

    out = bs.measure("http://x", bs.Saturation(stable_s=10), window_s=60, poll_s=2, timeout_s=300,
                     alive=lambda: None, get=get, clock=clock, sleep=clock.sleep)
    assert out["saturated"] and out["time_to_saturation_s"] == 20.0
    assert out["window"]["seconds"] == 60.0
    assert out["window"]["output_tok_per_s"] == pytest.approx(4000.0)
    assert out["trace"][0]["t"] == 0.0 and out["trace"][-1]["t"] == 80.0


def test_measure_times_out_unsaturated_and_stops_on_a_dead_server():
    clock = FakeClock()
    get = lambda _u: _scrape(clock.now, decode=100 * clock.now, running=5, queued=0, usage=0.1)  # noqa: E731
    out = bs.measure("http://x", bs.Saturation(), window_s=10, poll_s=2, timeout_s=20,
                     alive=lambda: None, get=get, clock=clock, sleep=clock.sleep)
    assert not out["saturated"] and out["time_to_saturation_s"] == 20.0
    assert out["window"]["output_tok_per_s"] == pytest.approx(100.0)
    with pytest.raises(RuntimeError, match="server exited"):
        bs.measure("http://x", bs.Saturation(), window_s=10, poll_s=2, timeout_s=20,
                   alive=lambda: "server exited with 1", get=get, clock=clock, sleep=clock.sleep)


# ---------------------------------------------------------------- over HTTP: /metrics and bench_serving


class ScriptedServer:
    """A tiny SGLang stand-in: scripted /metrics bodies in turn, /generate (non-streaming) and
    /server_info; records the /generate payloads."""

    def __init__(self, metrics_bodies, health=(200,)):
        self.metrics = list(metrics_bodies)
        self.health = list(health)
        self.payloads = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, body: bytes, ctype="application/json"):
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path == "/health":
                    status = outer.health.pop(0) if len(outer.health) > 1 else outer.health[0]
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif self.path == "/metrics":
                    body = outer.metrics.pop(0) if len(outer.metrics) > 1 else outer.metrics[0]
                    self._send(body.encode(), "text/plain; version=0.0.4")
                else:
                    self._send(json.dumps({"max_total_num_tokens": 123456, "internal_states": [{}]}).encode())

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.payloads.append(payload)
                n = payload["sampling_params"]["max_new_tokens"]
                self._send(json.dumps({"text": "ab" * n, "meta_info": {"completion_tokens": n}}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_scrape_over_http_and_pool_size():
    srv = ScriptedServer([metrics_text(decode=10, running=3), metrics_text(decode=70, running=4)])
    try:
        a, b = bs.scrape(srv.url), bs.scrape(srv.url)
        assert a.counter(bs.DECODE_COUNTER, mode="decode") == 10 and b.gauge("sglang:num_running_reqs") == 4
        assert b.t >= a.t
        assert bs.pool_tokens(srv.url) == 123456
    finally:
        srv.close()


def test_wait_ready_waits_for_health_and_reports_a_dead_server(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setattr(bs.time, "sleep", lambda s: None)
    srv = ScriptedServer([metrics_text(decode=0)], health=(503, 503, 200))
    alive = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert bs.wait_ready(srv.url, alive, 60, tmp_path / "log") >= 0
        assert srv.health == [200]  # it asked until the 200
        log = tmp_path / "server.log"
        log.write_text("line\nValueError: bad flag\n")
        dead = subprocess.Popen(["sh", "-c", "exit 3"])
        dead.wait()
        with pytest.raises(RuntimeError, match="exited with 3 during startup(.|\n)*bad flag"):
            bs.wait_ready(srv.url, dead, 60, log)
    finally:
        bs.stop(alive, grace_s=1)
        srv.close()


def test_replay_sends_exact_lengths_through_bench_servings_benchmark(tmp_path):
    from sparsespec_sglang.testing.model_dirs import make_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_model_dir(tmp_path / "tiny", "tiny", with_weights=False))
    reqs = wl.steady_state(wl.make_workload(6, seed=0, vocab_size=512, fixed_output_len=5), 2, vocab_size=512)
    srv = ScriptedServer([metrics_text(decode=0)])
    try:
        result = wl.replay(reqs, srv.url, temperature=0.6, tokenizer=tok, output_file=str(tmp_path / "r.jsonl"))
    finally:
        srv.close()
    sent = srv.payloads[1:]  # the first is bench_serving's warm-up request
    assert sorted((len(p["input_ids"]), p["sampling_params"]["max_new_tokens"]) for p in sent) == sorted(
        (r.prompt_len, r.output_len) for r in reqs)
    assert all(p["sampling_params"]["ignore_eos"] is True and p["sampling_params"]["temperature"] == 0.6
               and p["stream"] is False for p in sent)
    assert result["completed"] == len(reqs) and result["total_output_tokens"] == sum(r.output_len for r in reqs)


def test_replay_namespace_covers_every_arg_bench_serving_reads():
    from sparsespec_sglang.compat import bench_serving as serving

    src = "".join(inspect.getsource(f) for f in (serving.benchmark, serving.async_request_sglang_generate,
                                                  serving.calculate_metrics, serving.get_request))
    read = set(re.findall(r"\bargs\.([a-z_]+)", src))
    ns = wl.bench_serving_args(temperature=0.6, num_prompts=1, output_file=None)
    assert read and not (read - set(vars(ns))), sorted(read - set(vars(ns)))


@pytest.mark.parametrize("script", ["sleep 60 & sleep 60", "trap '' TERM; sleep 60 & sleep 60"])
def test_stop_ends_the_whole_process_group(script):
    import os
    import subprocess

    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    bs.stop(proc, grace_s=1.0)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)
    assert proc.returncode is not None


# A stand-in for `python -m sglang.launch_server`: /health 503 then 200, /server_info with the pool
# size, /metrics of a saturated server whose decode counter grows 1000 tokens/s (its accept-length
# gauge echoes SGLANG_SIMULATE_ACC_LEN), /generate that holds every request (the load never ends).
FAKE_SERVER = """
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

T0 = time.monotonic()
ACC = float(os.environ.get("SGLANG_SIMULATE_ACC_LEN", "0"))
L = 'model_name="m",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"'
generate_calls = [0]


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def reply(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        t = time.monotonic() - T0
        if self.path == "/health":
            self.reply(200 if t > 1.0 else 503)
        elif self.path == "/server_info":
            self.reply(200, json.dumps({"max_total_num_tokens": 50000}).encode())
        elif self.path == "/model_info":
            self.reply(200, json.dumps({"model_path": sys.argv[2], "tokenizer_path": sys.argv[2]}).encode())
        elif self.path == "/metrics":
            sending = generate_calls[0] > 0
            lines = [f'sglang:realtime_tokens_total{{{L},mode="decode"}} {1000.0 * t}',
                     f"sglang:num_running_reqs{{{L}}} {50 if sending else 0}",
                     f"sglang:num_queue_reqs{{{L}}} {100 if sending else 0}",
                     f"sglang:token_usage{{{L}}} {0.95 if sending else 0.0}",
                     f"sglang:spec_accept_length{{{L}}} {ACC}"]
            self.reply(200, ("\\n".join(lines) + "\\n").encode())
        else:
            self.reply(404)

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        generate_calls[0] += 1
        time.sleep(600)


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_run_one_drives_a_server_and_its_load_end_to_end(tmp_path, tiny_model_dir, monkeypatch):
    """run_one: launch, /health, pool size, mid-run workload, bench_serving load, saturation, the
    window, forced acceptance for a speculative server only, and both process groups stopped."""
    import os
    import subprocess

    def fake_command(model_dir, port, flags, args):
        return [sys.executable, "-c", FAKE_SERVER, str(port), model_dir]

    started = []
    real_popen = subprocess.Popen

    def popen(*a, **kw):
        started.append(real_popen(*a, **kw))
        return started[-1]

    monkeypatch.setattr(bs, "server_command", fake_command)
    monkeypatch.setattr(bs.subprocess, "Popen", popen)
    args = bs.parse_args(["--config", "sparsespec", "--out", "x.json", "--window", "3", "--poll", "0.5",
                          "--stable-s", "1", "--saturation-timeout", "120", "--num-requests", "512"])
    args.seed, args.vocab_size = 0, 512
    fresh = wl.make_workload(512, seed=0, vocab_size=512, fixed_output_len=64)
    rec = bs.run_one("sparsespec", tiny_model_dir, fresh, args, tmp_path)
    assert rec["forced_accept"] == 7.0 and rec["saturated"], rec
    assert rec["pool_tokens"] == 50000 and rec["num_mid_run"] == bs.num_mid_run(50000, fresh, 1.0)
    assert rec["requests"]["num_requests"] == 512 + rec["num_mid_run"]
    w = rec["window"]
    assert w["seconds"] >= 3 and w["output_tok_per_s"] == pytest.approx(1000.0, rel=0.1)
    assert w["spec_accept_length"]["mean"] == 7.0  # the server saw SGLANG_SIMULATE_ACC_LEN
    assert w["running_requests"]["mean"] == 50 and rec["cuda_graph_covers_batch"]
    assert "--speculative-algorithm SPARSESPEC" in rec["server_command"] or rec["server_flags"][:2] == [
        "--speculative-algorithm", "SPARSESPEC"]
    assert len(started) == 2  # the server and the bench_serving load
    for proc in started:
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)


@pytest.mark.parametrize("name", bs.CONFIGS)
def test_forced_acceptance_for_speculative_servers_only(name):
    env, forced = bs.server_env(bs.config_flags(name, 8, 48), 7.0, {"PATH": "/bin", "SGLANG_SIMULATE_ACC_LEN": "3"})
    if name.startswith("plain"):
        assert forced is None and env == {"PATH": "/bin"}  # not even inherited
    else:
        assert forced == 7.0 and env == {"PATH": "/bin", "SGLANG_SIMULATE_ACC_LEN": "7.0"}


PARENT_DIES = """
import subprocess, sys
sys.path.insert(0, sys.argv[1])
import bench_saturated as bs
child = subprocess.Popen(["sleep", "60"], preexec_fn=bs.child_setup, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the pipe ends with the parent
print(child.pid, flush=True)
"""


def test_a_started_process_dies_with_this_script():
    import os
    import subprocess
    import time

    scripts = str(Path(bs.__file__).parent)
    out = subprocess.run([sys.executable, "-c", PARENT_DIES, scripts], capture_output=True, text=True,
                         timeout=50, check=True).stdout  # returns when the parent exits, not the child
    pid = int(out.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)  # its own group, led by it
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.killpg(pid, 9)
    pytest.fail("the child outlived the script that started it")


def test_a_failed_run_keeps_its_record(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(bs, "server_command", lambda *a: [sys.executable, "-c", "import sys; print('bad flag'); sys.exit(2)"])
    args = bs.parse_args(["--config", "plain", "--out", "x.json", "--num-requests", "512"])
    rec = bs.run_one("plain", tiny_model_dir, [], args, tmp_path)
    assert "exited with 2 during startup" in rec["error"] and "bad flag" in rec["error"]
    assert rec["config"] == "plain" and rec["forced_accept"] is None and "wall_s" in rec


# ---------------------------------------------------------------- launch commands, CLI, JSON


@pytest.fixture(scope="module")
def sglang_parser():
    import argparse

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import ServerArgs

    load_plugins()
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    return str(make_model_dir(tmp_path_factory.mktemp("m") / "tiny", "tiny", with_weights=False))


@pytest.mark.parametrize("name", bs.CONFIGS)
def test_every_configuration_parses_with_sglangs_own_parser(sglang_parser, tiny_model_dir, name):
    args = bs.parse_args(["--config", name, "--out", "x.json", "--server-args", "--chunked-prefill-size 8192"])
    cmd = bs.server_command(tiny_model_dir, 30000, bs.config_flags(name, 8, 48), args)
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    ns = sglang_parser.parse_args(cmd[3:])
    assert ns.enable_metrics and ns.disable_prefill_cuda_graph and ns.load_format == "dummy"
    assert ns.cuda_graph_max_bs_decode == 160 and ns.max_running_requests == 256
    assert ns.chunked_prefill_size == 8192
    spec = ns.speculative_algorithm
    assert spec == {"plain": None, "plain-flashinfer": None, "plain-hicache": None, "ngram": "NGRAM"}.get(name, "SPARSESPEC")
    assert ns.enable_hierarchical_cache == (name not in ("plain", "plain-flashinfer", "ngram", "sparsespec-no-hicache"))
    assert bs.is_speculative(bs.config_flags(name, 8, 48)) == (spec is not None)
    # SGLang's and the plugin's validation accept the whole command (ServerArgs on CPU), resolved as
    # SGLang's launcher resolves it; what resolution decided is read through SGLang's resolved view.
    from sglang.srt.server_args import ServerArgs

    from sparsespec_sglang.compat import resolve_server_args, resolved_view

    sa = ServerArgs.from_cli_args(sglang_parser.parse_args(cmd[3:] + ["--device", "cpu"]))
    resolve_server_args(sa)
    resolved = resolved_view(sa)
    assert resolved.max_running_requests == 256
    assert resolved.speculative_num_draft_tokens == (None if spec is None else 9)


def test_ablation_flags_change_one_thing_each():
    base = bs.config_flags("sparsespec", 8, 48)
    for name, extra in (("sparsespec-lockstep", ["--sparsespec-schedule", "lockstep"]),
                        ("sparsespec-nodelay", ["--sparsespec-disable-delayed-verify"]),
                        ("sparsespec-draftnorm", ["--sparsespec-score-norm", "draft"])):
        assert bs.config_flags(name, 8, 48) == base + extra
    assert bs.config_flags("sparsespec-no-hicache", 8, 48) == base[:4]


@pytest.mark.parametrize("argv,message", [
    (["--pair", "plain,eagle"], "--pair/--config: unknown eagle; allowed: plain,"),
    (["--pair", "plain"], "--pair takes two or more names"),
    (["--config", "plain", "--mode", "burst"], "--mode must be one of: steady-state, decode-fill"),
    (["--config", "plain", "--num-requests", "100"], "--num-requests must be >= 512"),
    (["--config", "sparsespec", "--forced-accept", "12"], "--forced-accept must be in [1, k+1 = 9]"),
    (["--config", "plain", "--window", "0"], "--window must be > 0"),
])
def test_bad_flags_give_one_line_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        bs.parse_args(argv + ["--out", "x.json"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_pair_report_json(tmp_path, monkeypatch):
    tput = {"plain": 4000.0, "sparsespec": 6000.0}

    def fake_run(name, model_dir, fresh, args, work):
        assert len(fresh) == 512 and args.mode == "steady-state"
        forced = args.forced_accept if name != "plain" else None
        return {"config": name, "forced_accept": forced, "saturated": True,
                "window": {"output_tok_per_s": tput[name], "seconds": 60.0}}

    monkeypatch.setattr(bs, "run_one", fake_run)
    monkeypatch.setattr(bs, "gpu_name", lambda: "NVIDIA H200")
    out = tmp_path / "r.json"
    assert bs.main(["--pair", "plain,sparsespec", "--num-requests", "512", "--shape", "tiny",
                    "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "steady-state" and report["gpu"] == "NVIDIA H200"
    assert report["ratio"] == {"sparsespec/plain": 1.5}
    assert [r["config"] for r in report["runs"]] == ["plain", "sparsespec"]
    assert [r["forced_accept"] for r in report["runs"]] == [None, 7.0]
    assert report["forced_acceptance"] == {"plain": None, "sparsespec": 7.0}
    assert report["commit"] and report["versions"]["sglang"] == importlib.metadata.version("sglang")
    assert report["workload"]["num_requests"] == 512 and report["workload"]["ignore_eos"] is True
    assert "--pair plain,sparsespec" in report["command"]
    assert report["settings"]["window"] == 60.0


def test_a_failed_run_keeps_the_other_and_exits_nonzero(tmp_path, monkeypatch):
    def fake_run(name, *a):
        if name == "sparsespec":
            raise RuntimeError("server exited with 1")
        return {"config": name, "window": {"output_tok_per_s": 1.0}}

    monkeypatch.setattr(bs, "run_one", fake_run)
    out = tmp_path / "r.json"
    assert bs.main(["--pair", "plain,sparsespec", "--num-requests", "512", "--shape", "tiny",
                    "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["runs"][1] == {"config": "sparsespec", "error": "server exited with 1"}
    assert "ratio" not in report


def test_replay_imports_bench_serving_without_hf_datasets():
    """The GPU host's SGLang bundle has no Hugging Face `datasets`; bench_serving's module-level
    import of it must not stop a replay, and a hub loader must still fail with one clear line."""
    code = (
        "import sys; sys.modules['datasets'] = None\n"  # `import datasets` now raises ImportError
        "sys.path.insert(0, 'scripts'); import workload\n"
        "workload._allow_without_hf_datasets()\n"
        "from sparsespec_sglang.compat import bench_serving\n"
        "import datasets\n"
        "try:\n    datasets.load_dataset('x')\nexcept RuntimeError as e:\n    print('ok', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok ") and "pip install datasets" in out.stdout


def test_ratios_are_also_over_the_faster_plain_backend(tmp_path, monkeypatch):
    tput = {"plain": 4000.0, "plain-flashinfer": 5000.0, "sparsespec": 6000.0}
    monkeypatch.setattr(bs, "run_one", lambda name, *a: {
        "config": name, "forced_accept": None, "saturated": True,
        "window": {"output_tok_per_s": tput[name], "seconds": 60.0}})
    monkeypatch.setattr(bs, "gpu_name", lambda: "NVIDIA H200")
    out = tmp_path / "r.json"
    assert bs.main(["--pair", "plain,plain-flashinfer,sparsespec", "--num-requests", "512", "--shape", "tiny",
                    "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ratio"] == {"plain-flashinfer/plain": 1.25, "sparsespec/plain": 1.5}
    assert report["ratio_over_fastest_plain"] == {"plain/plain-flashinfer": 0.8, "sparsespec/plain-flashinfer": 1.2}


def test_a_run_that_errored_after_its_window_forms_no_ratio(tmp_path, monkeypatch):
    """run_one keeps a measured window next to the error that followed it (say the server died while
    stopping): such a run's number is not a result and no ratio may use it, as baseline or run."""
    tput = {"plain": 4000.0, "plain-flashinfer": 3000.0, "sparsespec": 6000.0}

    def fake_run(name, *a):
        record = {"config": name, "forced_accept": None, "window": {"output_tok_per_s": tput[name]}}
        if name == "plain":
            record["error"] = "server exited with -9"
        return record

    monkeypatch.setattr(bs, "run_one", fake_run)
    out = tmp_path / "r.json"
    assert bs.main(["--pair", "plain,plain-flashinfer,sparsespec", "--num-requests", "512", "--shape", "tiny",
                    "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["ratio"] == {"sparsespec/plain-flashinfer": 2.0}
    assert "ratio_over_fastest_plain" not in report


def test_merge_joins_consecutive_runs_of_one_workload_and_refuses_others(tmp_path, monkeypatch):
    tput = {"plain": 4000.0, "sparsespec": 9000.0}
    monkeypatch.setattr(bs, "run_one", lambda name, *a: {
        "config": name, "forced_accept": None if name == "plain" else 7.0, "saturated": True,
        "window": {"output_tok_per_s": tput[name], "seconds": 60.0}})
    monkeypatch.setattr(bs, "gpu_name", lambda: "NVIDIA H200")
    common = ["--num-requests", "512", "--shape", "tiny"]
    for name in ("plain", "sparsespec"):
        assert bs.main(["--config", name, *common, "--out", str(tmp_path / f"{name}.json")]) == 0
    assert bs.main(["--config", "plain", *common, "--seed", "1", "--out", str(tmp_path / "other.json")]) == 0
    out = tmp_path / "pair.json"
    assert bs.main(["--merge", str(tmp_path / "plain.json"), str(tmp_path / "sparsespec.json"), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ratio"] == {"sparsespec/plain": 2.25} and report["same_process"] is False
    assert [r["config"] for r in report["runs"]] == ["plain", "sparsespec"] and len(report["commands"]) == 2
    with pytest.raises(SystemExit, match="differs .* in 'workload'"):
        bs.main(["--merge", str(tmp_path / "other.json"), str(tmp_path / "sparsespec.json"), "--out", str(out)])
