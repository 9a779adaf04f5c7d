"""scripts/natural_acceptance.py's CPU parts: SGLang's spec meta_info fields (as the installed
release's tokenizer manager writes them), the mean arithmetic, the verdict, and the reference side
on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import natural_acceptance as na  # noqa: E402


def _sglang_meta_info(verify_ct: int, correct: int, completion: int, k: int = 8,
                      histogram: list[int] | None = None) -> dict:
    """meta_info spec fields exactly as the installed SGLang's TokenizerManager computes them. It
    reads the draft width from its own server args (0.5.17) or the published config (0.5.18 on):
    SGLang's test override publishes one, and the stand-in manager holds the same."""
    from sglang.srt.managers.tokenizer_manager import TokenizerManager
    from sglang.srt.runtime_context import get_context

    recv = SimpleNamespace(spec_verify_ct=[verify_ct], spec_num_correct_drafts=[correct],
                           completion_tokens=[completion], spec_correct_drafts_histogram=[histogram])
    meta: dict = {"completion_tokens": completion}
    with get_context().override_server_args(speculative_num_draft_tokens=k + 1) as server_args:
        TokenizerManager._calculate_spec_decoding_metrics(SimpleNamespace(server_args=server_args), meta, recv, 0)
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
    args = SimpleNamespace(ref_device="cpu", ref_dtype="float32", quiet=True, max_new_tokens=12, k=3,
                           sparsity=0.05, min_selected=2, score_norm=None, selection=None, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]
    outs, none = na.run_reference(str(model_dir), prompts, args)
    assert none is None
    for out in outs:
        stats = na.reference_request_stats(out.accepted_counts)
        assert len(out.tokens) == 12 and stats["cycles"] == len(out.cycles) >= 1
        # prefill token + (accepted + bonus) per cycle, the last cycle possibly cut at the budget
        assert 1 + stats["accepted"] + stats["cycles"] >= len(out.tokens)
        assert 0 <= stats["mean_accepted"] <= 3

    # Aligned: along the free run's own tokens the reference reproduces it; along another
    # trajectory (one token changed, cut short) it commits exactly that trajectory.
    other = outs[1].tokens[:5] + [(outs[1].tokens[5] + 1) % 200 + 3] + outs[1].tokens[6:10]
    free, aligned = na.run_reference(str(model_dir), prompts, args, [outs[0].tokens, other])
    assert [o.tokens for o in free] == [o.tokens for o in outs]
    assert aligned[0].tokens == outs[0].tokens and aligned[0].accepted_counts == outs[0].accepted_counts
    assert aligned[1].tokens == other
    assert 1 + sum(aligned[1].accepted_counts) + len(aligned[1].cycles) >= len(other)


def test_sglang_histogram_and_reference_histogram():
    meta = _sglang_meta_info(4, 8, 13, k=3, histogram=[1, 0, 1, 2])
    assert na.sglang_request_stats(meta)["histogram"] == [1, 0, 1, 2]
    assert na.sglang_request_stats(_sglang_meta_info(0, 0, 1))["histogram"] == []
    assert na.accepted_histogram([3, 0, 2, 3]) == [1, 0, 1, 2]
    assert na.accepted_histogram([]) == []


def test_aligned_comparison_arithmetic():
    sg_a = na.sglang_request_stats(_sglang_meta_info(4, 8, 13, k=3, histogram=[1, 0, 1, 2]))
    sg_b = na.sglang_request_stats(_sglang_meta_info(2, 2, 5, k=3, histogram=[0, 2]))
    same = na.aligned_request_stats(sg_a, [3, 0, 2, 3])  # same cycles in another order
    assert same["same_cycles"] and same["same_accepted"] and same["same_histogram"]
    assert same["difference"] == pytest.approx(0.0)
    assert same["reference"]["accepted_without_last"] == 5 and same["reference"]["histogram"] == [1, 0, 1, 2]
    # One more draft accepted in one cycle: one token more per that cycle, so one cycle fewer.
    off = na.aligned_request_stats(sg_b, [2])
    assert (off["same_cycles"], off["same_accepted"], off["same_histogram"]) == (False, True, False)
    assert off["difference"] == pytest.approx(1.0 - 2.0)
    res = na.compare_aligned([sg_a, sg_b], [same, off], tolerance=0.4)
    assert res["sglang_mean_accepted"] == pytest.approx(10 / 6)  # pooled: cycles weigh the same
    assert res["reference_mean_accepted"] == pytest.approx(10 / 5)
    assert res["reference_mean_accepted_without_last_cycle"] == pytest.approx(5 / 3)
    assert (res["sglang_cycles"], res["reference_cycles"]) == (6, 5)
    assert (res["requests_same_cycles"], res["requests_same_accepted"], res["requests_same_histogram"]) == (1, 2, 1)
    assert res["difference"] == pytest.approx(10 / 6 - 2.0) and res["within_tolerance"]
    assert not na.compare_aligned([sg_a, sg_b], [same, off], tolerance=0.3)["within_tolerance"]
    assert not na.compare_aligned([], [], tolerance=1.0)["within_tolerance"]


def test_main_report_with_a_stand_in_engine(tmp_path, monkeypatch):
    """main() end to end, the SGLang engine replaced by a stand-in that drafts like the reference
    but decodes another text (the reference's own with one token changed; its tokens and counts in
    SGLang's meta_info form): the aligned reference must agree exactly, and decide the verdict
    although the free-running numbers differ."""
    import json

    import torch

    from sparsespec_sglang.testing import reference as R
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    torch.set_num_threads(2)
    model_dir = str(make_model_dir(tmp_path / "tiny", "tiny"))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18]]

    def stand_in(model_dir, prompts, args):
        model = R.load_model(model_dir)
        outs = []
        for p in prompts:
            kw = dict(k=args.k, sparsity=args.sparsity, min_sel=args.min_selected, ignore_eos=True)
            own = R.sparsespec_generate(model, p, args.max_new_tokens, **kw).tokens
            o = R.sparsespec_generate(model, p, args.max_new_tokens, follow_tokens=own[:4] + [own[4] % 200 + 3]
                                      + own[5:], **kw)
            meta = _sglang_meta_info(len(o.cycles), sum(o.accepted_counts), len(o.tokens), k=args.k,
                                     histogram=na.accepted_histogram(o.accepted_counts))
            outs.append({"output_ids": o.tokens, "meta_info": meta})
        return outs, {"seconds": 0.0, "engine_mean_accepted": None, "sparsespec_config": {}}

    monkeypatch.setattr(na, "run_sglang", stand_in)
    monkeypatch.setattr(na, "load_prompts", lambda *a: prompts)
    out = tmp_path / "acc.json"
    monkeypatch.setattr(sys, "argv", ["natural_acceptance.py", "--model-dir", model_dir, "--out", str(out),
                                      "--num-prompts", "2", "--max-new-tokens", "12", "--k", "3",
                                      "--min-selected", "2", "--ref-device", "cpu", "--ignore-eos", "--quiet",
                                      "--tolerance", "0"])
    assert na.main() == 0
    rep = json.loads(out.read_text())
    al = rep["aligned"]
    assert al["difference"] == 0.0 and al["within_tolerance"] and rep["verdict"].endswith("pass")
    assert al["requests_same_cycles"] == al["requests_same_accepted"] == al["requests_same_histogram"] == 2
    # The old free-running fields: other texts, other means.
    assert not rep["within_tolerance"] and rep["difference"] != 0.0 and rep["requests_identical_tokens"] == 0
    for r in rep["requests"]:
        assert r["aligned_tokens_equal_sglang"] and r["aligned_cycles"][0][0] == 0
        assert sum(a for _, a in r["aligned_cycles"]) == r["sglang"]["accepted"]
