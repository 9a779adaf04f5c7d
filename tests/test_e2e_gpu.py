"""End-to-end on the GPU host: SPARSESPEC greedy output equals plain SGLang decoding."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parent.parent


def _check_lossless(out: Path, *args: str) -> dict:
    """Run scripts/check_lossless.py; every SPARSESPEC run must match plain decoding up to ties."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_lossless.py"), "--out", str(out), *args],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for name, run in report["runs"].items():
        if name != "plain":
            # bf16 (SGLang has no fp32 rmsnorm): a divergence from plain decoding is only
            # allowed where plain's own top-2 logprobs are within bf16 rounding of a tie.
            assert run["num_clear_mismatches"] == 0, (name, run["mismatches"])
    return report


def test_greedy_output_equals_plain_decoding(tmp_path):
    """The lockstep schedule (the unified one, the default, has its own test below)."""
    report = _check_lossless(tmp_path / "lossless.json", "--num-prompts", "8", "--max-new-tokens", "128",
                             "--prompt-len", "64", "256", "--dense-check", "--schedule", "lockstep")
    # Dense drafts equal the full model up to rounding: nearly every draft is accepted.
    assert report["runs"]["sparsespec-no-overlap-s1.0"]["mean_spec_accept_length"] > 6.0


def test_join_leave_and_retract_stay_lossless(tmp_path):
    """Requests arrive while others decode, finish at ragged lengths mid-cycle, and a KV pool
    capped below the batch's need forces SGLang to retract and re-admit requests (default,
    unified schedule)."""
    _check_lossless(tmp_path / "lossless_churn.json", "--num-prompts", "16", "--max-new-tokens", "256",
                    "--prompt-len", "64", "256", "--ragged-max-new-tokens", "--stagger-s", "0.05",
                    "--max-total-tokens", "2500", "--modes", "overlap", "--dtype", "bfloat16")


def test_unified_schedule_stays_lossless_as_requests_join_and_leave(tmp_path):
    """Unified draft/verify passes: requests arrive while others decode and finish at
    ragged lengths, so phases are assigned and rebalanced mid-run, in both scheduler modes. The
    8th and 16th requests ask for logprobs: while one runs, the batch takes the lockstep path (with
    its own draft graphs), and unified passes resume after it finishes."""
    report = _check_lossless(tmp_path / "lossless_unified.json", "--num-prompts", "16",
                             "--max-new-tokens", "256", "--prompt-len", "64", "256",
                             "--ragged-max-new-tokens", "--stagger-s", "0.05", "--dtype", "bfloat16",
                             "--schedule", "unified", "--dense-check", "--spec-logprob-every", "8")
    # Dense drafts equal the full model up to rounding: the unified passes accept nearly all.
    assert report["runs"]["sparsespec-no-overlap-s1.0"]["mean_spec_accept_length"] > 6.0


def test_unified_schedule_without_cuda_graphs_stays_lossless(tmp_path):
    """Every unified pass eager: a pass has up to ~2x as many rows as the batch has requests,
    more than SGLang's eager input buffers (max_running_requests) hold."""
    _check_lossless(tmp_path / "lossless_unified_eager.json", "--num-prompts", "16",
                    "--max-new-tokens", "64", "--prompt-len", "64", "128", "--dtype", "bfloat16",
                    "--schedule", "unified", "--disable-cuda-graph", "--modes", "overlap")


@pytest.mark.parametrize("dense_backend", ["triton", "flashinfer"])
def test_adaptive_speculation_stays_lossless_as_requests_join_and_leave(tmp_path, dense_backend):
    """--sparsespec-adaptive on: requests switch between speculating and decoding densely, and
    steps whose requests are all dense run as plain decode forwards on the dense backend (its own
    CUDA graphs), in both scheduler modes."""
    _check_lossless(tmp_path / f"lossless_adaptive_{dense_backend}.json", "--num-prompts", "16",
                    "--max-new-tokens", "256", "--prompt-len", "64", "256", "--ragged-max-new-tokens",
                    "--stagger-s", "0.05", "--dtype", "bfloat16", "--schedule", "unified", "--adaptive", "on",
                    "--dense-backend", dense_backend)


def test_retracted_requests_come_back_from_the_host_cache_losslessly(tmp_path):
    """The same capped pool with --enable-hierarchical-cache: retracted requests' KV is kept
    (patches/retraction.py) and re-admission is a prefix-cache hit instead of a recompute."""
    report = _check_lossless(tmp_path / "lossless_hicache.json", "--num-prompts", "16", "--max-new-tokens",
                             "256", "--prompt-len", "64", "256", "--max-total-tokens", "2500",
                             "--modes", "overlap", "--dtype", "bfloat16", "--hierarchical-cache")
    plain, spec = report["runs"]["plain"], report["runs"]["sparsespec-overlap-s0.05"]
    assert spec["retractions"] > 0, spec
    assert spec["prefill_cached_tokens"] > plain["prefill_cached_tokens"], report["runs"]


def test_deterministic_inference_output_is_exactly_plain(tmp_path):
    """With --enable-deterministic-inference every verified token goes through the same decode
    kernel and batch-invariant GEMMs as plain decoding: exact equality, ties included."""
    report = _check_lossless(tmp_path / "lossless_det.json", "--num-prompts", "8", "--max-new-tokens",
                             "128", "--prompt-len", "64", "256", "--dtype", "bfloat16", "--deterministic",
                             "--modes", "overlap,no-overlap")
    for name, run in report["runs"].items():
        if name != "plain":
            assert run["equal"], (name, run["mismatches"])


def test_sampling_preserves_the_target_distribution(tmp_path):
    """Temperature / top-p / top-k sampling: SPARSESPEC's token counts match plain decoding's
    (chi-square per prompt, position and setting; sparse drafts = residual path, dense drafts
    = acceptance path), and the same test does separate plain decoding's two settings."""
    out = tmp_path / "sampling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_sampling.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["power_check_pvalue"] < report["bonferroni_threshold"], report["power_check_pvalue"]
    for name, run in report["runs"].items():
        assert run["min_pvalue"] >= report["bonferroni_threshold"], (name, run["min_pvalue"])
