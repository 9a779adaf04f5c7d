"""scripts/natural_acceptance.py's CPU parts: SGLang's spec meta_info fields (as 0.5.17's tokenizer
manager writes them), the mean arithmetic, the verdict, and the reference side on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import natural_acceptance as na  # noqa: E402


def _sglang_meta_info(verify_ct: int, correct: int, completion: int, k: int = 8) -> dict:
    """meta_info spec fields exactly as SGLang 0.5.17's TokenizerManager computes them."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager

    tm = SimpleNamespace(server_args=SimpleNamespace(speculative_num_draft_tokens=k + 1))
    recv = SimpleNamespace(spec_verify_ct=[verify_ct], spec_num_correct_drafts=[correct],
                           completion_tokens=[completion], spec_correct_drafts_histogram=None)
    meta: dict = {"completion_tokens": completion}
    TokenizerManager._calculate_spec_decoding_metrics(tm, meta, recv, 0)
    return meta


def test_sglang_request_stats_from_meta_info():
    meta = _sglang_meta_info(verify_ct=10, correct=53, completion=64)
    stats = na.sglang_request_stats(meta)
    assert (stats["cycles"], stats["accepted"]) == (10, 53)
    assert stats["mean_accepted"] == pytest.approx(5.3)
    # SGLang's own accept length counts the bonus and the prefill token: not our per-cycle mean.
    assert stats["spec_accept_length"] == pytest.approx(6.4)
    never = na.sglang_request_stats(_sglang_meta_info(verify_ct=0, correct=0, completion=1))
    assert (never["cycles"], never["mean_accepted"]) == (0, None)


def test_reference_stats_and_pooled_vs_per_request_means():
    a = na.reference_request_stats([8, 8, 2])  # 3 cycles, 18 accepted
    b = na.reference_request_stats([1])
    assert (a["cycles"], a["accepted"], a["mean_accepted"]) == (3, 18, 6.0)
    assert (a["cycles_without_last"], a["accepted_without_last"], a["mean_accepted_without_last"]) == (2, 16, 8.0)
    assert (b["cycles_without_last"], b["mean_accepted_without_last"]) == (0, None)
    assert na.pooled_mean([a, b]) == pytest.approx(19 / 4)  # cycles weigh the same
    assert na.mean_of_means([a, b]) == pytest.approx((6.0 + 1.0) / 2)  # requests weigh the same
    assert na.pooled_mean([a, b], "accepted_without_last", "cycles_without_last") == pytest.approx(16 / 2)
    assert na.pooled_mean([]) is None and na.reference_request_stats([])["mean_accepted"] is None


def test_compare_verdict_and_engine_counter():
    sg = [na.sglang_request_stats(_sglang_meta_info(10, 50, 61))]
    ref = [na.reference_request_stats([5] * 10)]
    res = na.compare(sg, ref, tolerance=0.1)
    assert res["difference"] == pytest.approx(0.0) and res["within_tolerance"]
    ref_far = [na.reference_request_stats([6] * 10)]
    res = na.compare(sg, ref_far, tolerance=0.1)
    assert res["difference"] == pytest.approx(-1.0) and not res["within_tolerance"]
    assert na.compare(sg, ref_far, tolerance=1.0)["within_tolerance"]
    info = {"internal_states": [{"avg_spec_accept_length": 6.25}]}
    assert na.engine_mean_accepted(info) == pytest.approx(5.25)
    assert na.engine_mean_accepted({"internal_states": [{}]}) is None


def test_first_mismatch():
    assert na.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert na.first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert na.first_mismatch([1, 2], [1, 2, 3]) == 2


def test_reference_side_on_a_tiny_model(tmp_path):
    """The reference run the script makes: per-request cycles sum to the tokens it generated."""
    import torch

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    torch.set_num_threads(2)
    model_dir = make_model_dir(tmp_path / "tiny", "tiny")
    args = SimpleNamespace(ref_device="cpu", quiet=True, max_new_tokens=12, k=3, sparsity=0.05,
                           min_selected=2, score_norm=None, ignore_eos=True)
    outs = na.run_reference(str(model_dir), [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]], args)
    for out in outs:
        stats = na.reference_request_stats(out.accepted_counts)
        assert len(out.tokens) == 12 and stats["cycles"] == len(out.cycles) >= 1
        # prefill token + (accepted + bonus) per cycle, the last cycle possibly cut at the budget
        assert 1 + stats["accepted"] + stats["cycles"] >= len(out.tokens)
        assert 0 <= stats["mean_accepted"] <= 3
