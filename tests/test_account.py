"""scripts/account.py: the bytes each configuration must read, against hand-computed values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import account  # noqa: E402


def test_qwen3_8b_bytes():
    weights, kv = account.shape_bytes("qwen3-8b")
    assert kv == 2 * 36 * 8 * 128 * 2 == 147456  # 144 KiB per token
    per_layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128
    assert weights == (36 * per_layer + 151936 * 4096 + 4096) * 2
    assert 15.0e9 < weights < 15.2e9  # the 16.4 GB checkpoint less its embedding table


def _window(tps, running, context, accept=None, phases=None):
    w = {"output_tok_per_s": tps, "running_requests": {"mean": running},
         "context_tokens_per_running_request": {"mean": context}}
    if accept is not None:
        w["spec_accept_length"] = {"mean": accept}
    for name, ms in (phases or {}).items():
        w[f"sparsespec:{name}_gpu_ms_per_cycle"] = {"mean": ms}
    return w


def test_plain_step_and_lockstep_cycle(tmp_path):
    weights, kv = account.shape_bytes("qwen3-8b")
    report = {"shape": "qwen3-8b", "gpu": "g", "settings": {"k": 8}, "command": "c", "runs": [
        {"config": "plain", "forced_accept": None, "window": _window(1000.0, 40.0, 8000.0)},
        {"config": "sparsespec-lockstep", "forced_accept": 7.0,
         "window": _window(2000.0, 40.0, 8000.0, 7.0, {"draft": 60.0, "verify": 70.0, "accept": 1.0})},
        {"config": "sparsespec", "forced_accept": 7.0, "error": "died", "window": _window(9e9, 1.0, 1.0, 7.0)}]}
    acc = account.account(report, 1e12, "test")
    plain, spec = acc["runs"]  # the errored run is left out
    assert plain["measured_ms"] == pytest.approx(40.0)  # 40 requests, 1000 tok/s: a step is 40 ms
    assert plain["bytes_gb"] * 1e9 == pytest.approx(weights + 40 * 8000 * kv)
    assert plain["efficiency"] == pytest.approx((weights + 40 * 8000 * kv) / 1e12 * 1e3 / 40.0)
    k_sel = 400  # ceil(0.05 * 8000), inside [64, 2048]
    draft = 8 * 40 * (k_sel + 4 + 4.5) * kv
    assert spec["selected_per_request"] == k_sel
    assert spec["bytes_gb"] * 1e9 == pytest.approx(9 * weights + 40 * 8000 * kv + draft)
    assert spec["measured_ms"] == pytest.approx(40 * 7 / 2000.0 * 1e3)  # 140 ms per cycle
    assert spec["host_and_gaps_ms"] == pytest.approx(140.0 - 131.0)
    assert spec["phase_ideal_ms"]["verify"] == pytest.approx((weights + 40 * 8000 * kv) / 1e9)
    assert spec["phase_efficiency"]["draft"] == pytest.approx((8 * weights + draft) / 1e9 / 60.0)
    assert spec["measured_ratio_over_fastest_plain"] == pytest.approx(2.0)
    table = account.markdown(acc)
    assert "sparsespec-lockstep" in table and "verify 70.0 (ideal" in table


def test_cli_writes_json_and_refuses_a_bad_bandwidth(tmp_path, capsys):
    with pytest.raises(SystemExit):
        account.main(["x.json", "--bandwidth", "0", "--bandwidth-source", "s", "--out", str(tmp_path / "a.json")])
    assert "--bandwidth must be > 0" in capsys.readouterr().err
    results = Path(__file__).resolve().parents[1] / "benchmarks/results/saturated_paper_workload_h100.json"
    assert account.main([str(results), "--bandwidth", "3.35e12", "--bandwidth-source", "peak",
                         "--out", str(tmp_path / "a.json")]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["fastest_plain"] == "plain-flashinfer"
