"""CycleProfiler host-side bookkeeping (CPU; the CUDA-event mode runs on the GPU host)."""

import pytest
import torch

from sparsespec_sglang.profiling import PHASES, CycleProfiler


def test_host_phase_means_over_cycles():
    prof = CycleProfiler(every=1000)
    for _ in range(3):
        for _ in range(len(PHASES) + 1):
            prof.mark()
        prof.end_cycle(4, torch.tensor([2, 3, 1, 1]))
    summary = prof.summary()
    assert summary["cycles"] == 3 and summary["mean_batch"] == 4
    assert {f"host_{p}_ms" for p in PHASES} <= summary.keys()
    assert all(summary[f"host_{p}_ms"] >= 0 for p in PHASES)
    assert "gpu_cycle_ms" not in summary  # no CUDA events without SPARSESPEC_PROFILE


def test_a_missing_phase_mark_is_an_error():
    prof = CycleProfiler()
    prof.mark()
    prof.mark()
    with pytest.raises(AssertionError, match="mark"):
        prof.end_cycle(1, torch.tensor([1]))


def test_env_enables_profiling_on_rank_zero_only(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSESPEC_PROFILE", str(tmp_path / "p.json"))
    assert CycleProfiler.from_env(0).path == tmp_path / "p.json"
    assert CycleProfiler.from_env(1).path is None
