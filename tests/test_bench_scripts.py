"""The benchmark scripts' CPU parts: argument checks, speedup bookkeeping, plots and table, and
how the scripts reach SGLang."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import plot_results  # noqa: E402


def _sglang_imports(path: Path) -> tuple[list[str], list[str]]:
    """(SGLang modules ``path`` imports directly, names it imports from sparsespec_sglang.compat)."""
    direct, via_compat = [], []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            direct += [a.name for a in node.names if a.name.split(".")[0] == "sglang"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sglang":
            direct.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.module == "sparsespec_sglang.compat":
            via_compat += [a.name for a in node.names]
    return direct, via_compat


def test_scripts_reach_sglang_internals_only_through_compat():
    """SGLang's internals move between releases; the scripts and examples import only its public
    package (``import sglang as sgl``) directly and every internal by its compat name."""
    from sparsespec_sglang import compat

    files = sorted([*(ROOT / "scripts").glob("*.py"), *(ROOT / "examples").glob("*.py")])
    found = {p.name: _sglang_imports(p) for p in files}
    assert {name: d for name, (d, _) in found.items() if set(d) - {"sglang"}} == {}
    used = {n for _, names in found.values() for n in names}
    assert {"bench_serving", "DatasetRow", "wait_for_http_ready", "extend_attention_fwd"} <= used
    assert sorted(n for n in used if n not in compat.LOCATIONS and not callable(getattr(compat, n, None))) == []


def _point(run, batch, out, tps, forced=None):
    return {"run": run, "batch": batch, "input_len": 512, "output_len": out, "forced_accept": forced,
            "output_tok_per_s": tps, "latency_p50_s": 1.0,
            "mean_accept_length": forced}


def test_bench_throughput_refuses_bad_runs_and_acceptance_before_starting_engines():
    for extra, needle in ((["--runs", "plain,foo"], "--runs: unknown foo"),
                          (["--forced-accept", "0,7"], "--forced-accept: each value must be in [1, k+1 = 9]"),
                          (["--long-input-len", "0"], "--long-input-len must be a positive number of tokens"),
                          (["--long-input-len", "8192", "--long-share", "1.5"], "--long-share must be in (0, 1]")):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts/bench_throughput.py"), "--out", "x.json", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr


def test_a_mixed_batch_has_its_share_of_long_prompts_and_its_own_speedup_key():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_throughput as bt

    prompts = bt._prompts(8, 5, 32_000, seed=3, long_input_len=20, long_share=0.5)
    assert sorted(len(p) for p in prompts) == [5] * 4 + [20] * 4
    assert [len(p) for p in bt._prompts(8, 5, 32_000, seed=3)] == [5] * 8
    mixed = {"long_input_len": 20, "long_share": 0.5}
    points = [_point("plain", 8, 64, 100.0), {**_point("plain", 8, 64, 50.0), **mixed},
              _point("sparsespec", 8, 64, 80.0, forced=7.0), {**_point("sparsespec", 8, 64, 100.0, forced=7.0), **mixed}]
    bt.add_speedups(points)
    assert [p["speedup_vs_plain"] for p in points[2:]] == [0.8, 2.0]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-GPU path")
@pytest.mark.parametrize("script", ["bench_throughput.py", "bench_kernels.py", "check_sampling.py",
                                    "bench_prefix_reuse.py", "check_constrained.py"])
def test_gpu_scripts_stop_with_one_line_without_a_gpu(script, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [f"{script}: needs a CUDA GPU (torch.cuda.is_available() is False "
                                              "on this machine)"], proc.stderr


def test_plots_and_table_from_a_grid_and_an_old_single_shape_file(tmp_path):
    points = [_point("plain", b, o, 1000.0 * b / 32) for b in (32, 64) for o in (1024, 2048)]
    points += [_point("sparsespec", b, o, 1000.0 * b / 32 * f / 4, forced=f)
               for b in (32, 64) for o in (1024, 2048) for f in (1.0, 5.0, 9.0)]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"points": points}))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"batch": 128, "input_len": 512, "output_len": 4096, "runs": {
        "plain": {"output_tok_per_s": 3800.0, "latency_p50_s": 2.0, "mean_accept_length": None},
        "sparsespec": {"output_tok_per_s": 4560.0, "latency_p50_s": 2.0, "mean_accept_length": 7.0,
                       "forced_accept": 7.0}}}))
    out = tmp_path / "plots"
    sys.argv = ["plot_results.py", str(grid), str(old), "--out-dir", str(out)]
    assert plot_results.main() == 0
    for name in ("throughput_vs_batch.png", "throughput_vs_output_len.png", "speedup_vs_accept.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    rows = (out / "table.md").read_text().splitlines()
    assert len(rows) == 2 + len(points) + 2
    # forced accept 9 = 8 drafts accepted: 9/4 of plain's throughput; the old file's 4560/3800.
    assert any("| sparsespec | lockstep, exact scores | 64 | 512 | 2048 | 9 | 4500 | 2.25x |" in r for r in rows)
    assert any("| sparsespec | lockstep, exact scores | 128 | 512 | 4096 | 7 | 4560 | 1.20x |" in r and "old.json" in r
               for r in rows)


def test_speedups_only_against_plain_of_the_same_run(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"points": [_point("plain", 32, 1024, 1000.0)]}))
    b.write_text(json.dumps({"points": [_point("sparsespec", 32, 1024, 1500.0, forced=7.0)]}))
    points = plot_results.load_points([a, b])
    assert [p.get("speedup_vs_plain") for p in points] == [1.0, None]


def test_no_plot_from_a_single_x_value(tmp_path):
    grid = tmp_path / "one.json"
    grid.write_text(json.dumps({"points": [_point("plain", 32, 1024, 900.0),
                                           _point("sparsespec", 32, 1024, 1800.0, forced=7.0)]}))
    sys.argv = ["plot_results.py", str(grid), "--out-dir", str(tmp_path / "p")]
    assert plot_results.main() == 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["table.md"]
    assert "| 2.00x |" in (tmp_path / "p" / "table.md").read_text()


def _decode_line(running, tokens, tok_s, extra=""):
    return (f"[2026-11-24 03:57:37] Decode batch, #running-req: {running}, #token: {tokens}, token usage: 0.02, "
            f"{extra}cuda graph: True, gen throughput (token/s): {tok_s:.2f}, #queue-req: 0\n")


def test_speedup_vs_context_from_a_bench_log(tmp_path):
    import gzip

    # plain: 16 requests at 1K and 3K context per request; the spec run at 2K sits between them.
    log = ["[..] max_total_num_tokens=374561, chunked_prefill_size=8192\n",
           _decode_line(16, 16 * 1000, 2000.0), _decode_line(16, 16 * 3000, 1000.0),
           'plain {"batch": 16, "input_len": 512, "output_len": 4096, "forced_accept": null}\n',
           "[..] max_total_num_tokens=374561, chunked_prefill_size=8192\n",
           _decode_line(16, 16 * 2000, 1800.0, "accept len: 7.00, accept rate: 0.75, "),
           _decode_line(16, 16 * 5000, 1500.0, "accept len: 7.00, accept rate: 0.75, "),  # beyond plain's range
           _decode_line(0, 0, 0.0),
           _decode_line(16, 16 * 2500, 1500.0, "accept len: 7.00, accept rate: 0.75, "),
           'sparsespec-draftnorm {"batch": 16, "input_len": 512, "output_len": 4096, "forced_accept": 7.0}\n']
    path = tmp_path / "bench.log.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(log)
    curves = plot_results.load_log_curves(path)
    assert [(c["run"], c["batch"], c["forced_accept"], len(c["points"])) for c in curves] == [
        ("plain", 16, None, 2), ("sparsespec-draftnorm", 16, 7.0, 3)]
    lines = plot_results.context_speedups(curves)
    # plain interpolates to 1500 tok/s at 2K and 1250 at 2.5K; the 5K point has no plain to compare with.
    assert lines == {("sparsespec-draftnorm", 7.0, 16, "bench.log.gz"): [(2000.0, 1.2), (2500.0, 1.2)]}
    grid = tmp_path / "one.json"
    grid.write_text(json.dumps({"points": [_point("plain", 16, 4096, 900.0)]}))
    sys.argv = ["plot_results.py", str(grid), "--out-dir", str(tmp_path / "p"), "--logs", str(path)]
    assert plot_results.main() == 0
    assert (tmp_path / "p" / "speedup_vs_context.png").read_bytes()[:4] == b"\x89PNG"


def test_published_bench_log_gives_a_context_curve():
    curves = plot_results.load_log_curves(ROOT / "benchmarks/results/bench_b16_16k_h100.log.gz")
    (key, pts), = plot_results.context_speedups(curves).items()
    assert key[:3] == ("sparsespec-draftnorm", 7.0, 16) and len(pts) > 5
    assert pts[0][1] < 1.0 < pts[-1][1]  # loses at short context, wins at long context


@pytest.mark.parametrize("name", ["bench_b128_4k_spec_h100.json", "bench_b128_4k_plain_vs_draftnorm_h100.json"])
def test_published_results_load(name):
    points = plot_results.load_points([ROOT / "benchmarks/results" / name])
    assert points and all(p["output_tok_per_s"] > 0 for p in points)


def test_homogeneity_pvalue_matches_the_chi_square_tail():
    from collections import Counter

    import check_sampling

    # 2x2 table with expected 20 per cell: statistic 20, 1 dof -> p = erfc(sqrt(10)).
    p = check_sampling.homogeneity_pvalue(Counter(x=30, y=10), Counter(x=10, y=30))
    assert p == pytest.approx(7.7442e-06, rel=1e-3)
    assert check_sampling.homogeneity_pvalue(Counter(x=5), Counter(x=9)) == 1.0  # one category
    # Rare categories are pooled: 2 cells (x, rest) with identical proportions -> p = 1.
    p = check_sampling.homogeneity_pvalue(Counter(x=100, a=1, b=1), Counter(x=100, c=2))
    assert p == pytest.approx(1.0)


def test_homogeneity_pvalue_separates_distributions():
    import random
    from collections import Counter

    import check_sampling

    rng = random.Random(0)
    draw = lambda weights, n: Counter(rng.choices(range(len(weights)), weights, k=n))  # noqa: E731
    same = check_sampling.homogeneity_pvalue(draw([5, 3, 2, 1], 2000), draw([5, 3, 2, 1], 2000))
    shifted = check_sampling.homogeneity_pvalue(draw([5, 3, 2, 1], 2000), draw([4, 3, 2, 2], 2000))
    assert same > 1e-3 and shifted < 1e-6


def test_prefill_tokens_counted_from_the_scheduler_log():
    import check_lossless

    log = ("[2026-11-23 10:00:00] Prefill batch, #new-seq: 2, #new-token: 300, #cached-token: 0, "
           "token usage: 0.10, #running-req: 0, #queue-req: 0, #pending-token: 0, \n"
           "[2026-11-23 10:00:01] Decode batch, #running-req: 2, #token: 400, \n"
           "[2026-11-23 10:00:02] Prefill batch [17], #new-seq: 1, #new-token: 12, #cached-token: 388, "
           "full token usage: 0.5, #running-req: 1, \n")
    assert check_lossless._prefill_tokens(log) == {"prefill_computed_tokens": 312, "prefill_cached_tokens": 388}


def test_check_lossless_calls_equal_only_when_every_token_was_compared():
    """A run that parts from plain at a near-tie is not lossless: the tokens after the first
    divergence are never compared, and the report says how many positions were."""
    import check_lossless as cl

    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    same = cl._compare(ref, [r[:] for r in ref], [[1.0] * 4] * 2, 0.25)
    assert same["equal"] and same["positions_compared"] == same["positions_total"] == 8
    tie = cl._compare(ref, [[1, 2, 9, 9], [5, 6, 7, 8]], [[1.0, 1.0, 0.1, 1.0], [1.0] * 4], 0.25)
    assert not tie["equal"] and tie["num_clear_mismatches"] == 0
    assert tie["positions_compared"] == 3 + 4 and tie["mismatches"][0]["first_mismatch"] == 2
    clear = cl._compare(ref, [[1, 9, 3, 4], [5, 6, 7, 8]], [[1.0, 2.0, 1.0, 1.0], [1.0] * 4], 0.25)
    assert clear["num_clear_mismatches"] == 1
    assert cl.verdict([same, same]) == "EQUAL"
    assert cl.verdict([same, tie]) == "DIVERGED-AT-NEAR-TIES"
    assert cl.verdict([tie, clear]) == "MISMATCH"


def test_bench_kernels_case_with_unequal_contexts_runs_off_the_gpu(monkeypatch):
    """One bench_kernels shape with unequal contexts (``--spread``), the kernels interpreted on
    the CPU and each timing replaced by one call: every launch it times runs (equal splits and
    split_by_length), and our verify kernel's output equals SGLang's extend kernel on the same
    unequal batch."""
    import os

    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreted CPU run (a GPU host runs the bench itself)")
    import bench_kernels

    monkeypatch.setattr(bench_kernels, "DEVICE", "cpu")
    monkeypatch.setattr(bench_kernels, "DTYPE", torch.float32)
    monkeypatch.setattr(bench_kernels, "HQ", 4)
    monkeypatch.setattr(bench_kernels, "HKV", 2)
    monkeypatch.setattr(bench_kernels, "HEAD_DIM", 32)
    timed = []

    def call_once(fn, flush, **kwargs) -> float:
        fn()
        timed.append(fn)
        return 1.0

    monkeypatch.setattr(bench_kernels, "_time_ms", call_once)
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(4096, 2, 32, generator=gen), torch.randn(4096, 2, 32, generator=gen)
    res = bench_kernels._bench_case(3, 400, 0.05, 16, kv, None, 1, 1.0, gen, spread=0.5)
    assert bench_kernels.context_lengths(3, 400, 0.5) == [200, 400, 600] and res["max_context"] == 600
    assert len(timed) == 11
    assert res["verify"]["max_abs_diff_plain_vs_sglang"] < 1e-4
