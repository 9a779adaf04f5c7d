"""SPARSESPEC through SGLang's real engine on the CPU: SmolLM2-135M (real weights, fp32), SGLang's
scheduler, model runner and radix cache, the plugin's worker, schedules and attention backend.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) runs plain decoding with its PyTorch attention;
SPARSESPEC's Triton kernels run in the interpreter, sgl_kernel's CPU ops come from the stand-in in
tests/sgl_kernel_cpu, and the plugin's test mode (``SPARSESPEC_CPU_TEST=1``) lets it start on a
CPU. The overlap scheduler is off (it needs CUDA streams), so the unified schedule runs without
delayed verification here. Each engine runs in its own process (tests/cpu_engine_run.py).

Checked (unified on every release CI runs, lockstep and a hybrid selection on the oldest, a
request joining a running batch and requests retracted mid-output on the newest, to keep CI's two side-by-side runs short): the output equals plain SGLang's on the same engine token for token, drafts
are accepted only in part (the selection binds: K = 8 of ~120-140 tokens), and the acceptance
SGLang reports equals the PyTorch reference's (testing/reference.py) cycle for cycle along the
same tokens: the same count of cycles with 0, 1, ..., k accepted drafts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsespec_sglang import compat
from sparsespec_sglang.config import CPU_TEST_ENV, SparseSpecConfig

HERE = Path(__file__).resolve().parent
K, MIN_SELECTED, MAX_NEW = 4, 8, 24
QUESTION = ("Explain step by step how to compute 17 * 23, then check the result by another method "
            "and explain why both agree. ") * 3


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing.real_models import ensure_model

    model_dir = str(ensure_model("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    plain = run_engine(model_dir, [prompt], attention_backend="torch_native")[0]
    return model_dir, prompt, plain["output_ids"]


def run_engine(model_dir: str, prompts: list[list[int]], stagger_s: float = 0.0, env: dict | None = None,
               log: list | None = None, max_new_tokens: int = MAX_NEW, **engine: object) -> list[dict]:
    """One engine in its own process; ``env`` adds environment variables, ``log`` gets its stderr."""
    settings = dict(model_path=model_dir, device="cpu", dtype="float32", skip_tokenizer_init=True,
                    disable_cuda_graph=True, disable_overlap_schedule=True, max_total_tokens=4096,
                    max_running_requests=4, chunked_prefill_size=1024, mem_fraction_static=0.5, log_level="warning")
    spec = {"engine": {**settings, **engine}, "prompts": prompts, "max_new_tokens": max_new_tokens,
            "stagger_s": stagger_s}
    run_env = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "TRITON_INTERPRET": "1", CPU_TEST_ENV: "1",
               "PYTHONPATH": os.pathsep.join([str(HERE / "sgl_kernel_cpu"), os.environ.get("PYTHONPATH", "")]),
               **(env or {})}
    proc = subprocess.run([sys.executable, str(HERE / "cpu_engine_run.py"), json.dumps(spec)], env=run_env,
                          capture_output=True, text=True, timeout=900)
    if log is not None:
        log.append(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


# SGLang's per-request speculative metrics, by the names each release reports them under.
SPEC_META = {"accepted_drafts": ("spec_accepted_drafts", "spec_num_correct_drafts"),
             "proposed_drafts": ("spec_proposed_drafts", "spec_num_proposed_drafts"),
             "accept_histogram": ("spec_accept_histogram", "spec_correct_drafts_histogram")}


def spec_meta(meta: dict, what: str):
    for key in SPEC_META[what]:
        if key in meta:
            return meta[key]
    raise KeyError(f"no {what} in meta_info ({sorted(k for k in meta if k.startswith('spec'))})")


@pytest.fixture(scope="module")
def reference_hist(setup):
    """Cycles with 0..k accepted drafts, the reference drafting along plain's tokens (fp32), per
    ``--sparsespec-selection`` (computed once each)."""
    from sparsespec_sglang.testing import reference as R

    model_dir, prompt, tokens = setup
    model = R.load_model(model_dir)
    hists: dict[str, list[int]] = {}

    def hist_of(selection: str) -> list[int]:
        if selection not in hists:
            cfg = SparseSpecConfig(num_draft_steps=K, min_selected=MIN_SELECTED, selection=selection)
            out = R.sparsespec_generate(model, prompt, MAX_NEW, cfg, ignore_eos=True, target_tokens=tokens)
            assert out.tokens == tokens
            hist = [0] * (K + 1)
            for n in out.accepted_counts:
                hist[n] += 1
            hists[selection] = hist
        return hists[selection]

    return hist_of


# CI runs the suite once per SGLang release, side by side on a 2-core machine: the default (unified)
# runs on both, lockstep on the oldest release and the joining request on the newest.
NEWEST = compat.since("0.5.23")


OLDEST_ONLY = pytest.mark.skipif(NEWEST, reason="runs on the oldest release")


@pytest.mark.parametrize("schedule, selection", [
    ("unified", "pillar"), pytest.param("lockstep", "pillar", marks=OLDEST_ONLY),
    # the hybrid's recent half is an earlier start of the drafts' dense tail in the server path
    pytest.param("unified", "hybrid:0.5", marks=OLDEST_ONLY)])
def test_sparsespec_on_sglangs_cpu_engine_equals_plain_and_accepts_as_the_reference(setup, reference_hist,
                                                                                       schedule, selection):
    model_dir, prompt, plain = setup
    out = run_engine(model_dir, [prompt], speculative_algorithm="SPARSESPEC", speculative_num_steps=K,
                     sparsespec_schedule=schedule, sparsespec_min_selected=MIN_SELECTED,
                     sparsespec_selection=selection, triton_attention_num_kv_splits=1)[0]
    assert len(plain) == MAX_NEW and out["output_ids"] == plain
    meta = out["meta_info"]
    accepted, proposed = spec_meta(meta, "accepted_drafts"), spec_meta(meta, "proposed_drafts")
    assert 0 < accepted < proposed  # partly accepted
    hist = spec_meta(meta, "accept_histogram")  # SGLang's list ends at the largest count seen
    assert hist + [0] * (K + 1 - len(hist)) == reference_hist(selection)


@pytest.mark.skipif(not NEWEST, reason="runs on the newest release")
def test_a_request_joining_a_running_unified_batch_still_equals_plain(setup):
    """A second request arrives while the first is decoding, so it joins a running unified batch at
    a phase of its own; both outputs equal plain's."""
    model_dir, prompt, plain_first = setup
    prompts = [prompt, prompt[:60] + prompt[-5:]]
    plain = [plain_first] + [run_engine(model_dir, prompts[1:], attention_backend="torch_native")[0]["output_ids"]]
    outs = run_engine(model_dir, prompts, stagger_s=8.0, speculative_algorithm="SPARSESPEC",
                      speculative_num_steps=K, sparsespec_min_selected=MIN_SELECTED, triton_attention_num_kv_splits=1)
    assert [o["output_ids"] for o in outs] == plain


@pytest.mark.skipif(not NEWEST, reason="runs on the newest release")
def test_requests_retracted_mid_output_still_equal_plain(setup):
    """SGLang's own retraction test mode (SGLANG_TEST_RETRACT: the scheduler retracts requests of
    the running batch every few steps, as when the KV pool runs out): each retracted request is
    re-admitted from its prompt and output so far (its prefix from the radix cache), gets a fresh
    first-cycle window, and its output still equals plain decoding's."""
    model_dir, prompt, plain = setup
    log: list[str] = []
    outs = run_engine(model_dir, [prompt, prompt], env={"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "3"},
                      log=log, speculative_algorithm="SPARSESPEC", speculative_num_steps=K,
                      sparsespec_min_selected=MIN_SELECTED, triton_attention_num_kv_splits=1,
                      log_level="warning")
    retracted = [int(n) for n in re.findall(r"Testing retraction\. #retracted_reqs: (\d+)", log[0])]
    assert sum(retracted) > 0, log[0][-3000:]
    assert [o["output_ids"] for o in outs] == [plain, plain]


@pytest.mark.skipif(NEWEST, reason="runs on the oldest release")
def test_adaptive_speculation_on_sglangs_cpu_engine_equals_plain(setup):
    """--sparsespec-adaptive on: at this context (~130 tokens) and model (0.5 GB of fp32 weights
    against 46 KB of KV per token) the policy decodes the request densely, so its steps are plain
    decode forwards of SGLang's (no plan on the batch), k + 1 per step; the output equals plain's
    (the prefill's token and two steps of k = 1: a plain decode forward in the Triton interpreter
    takes seconds, and CI's time is short)."""
    model_dir, prompt, plain = setup
    k = 1
    n = 1 + 2 * (k + 1)
    out = run_engine(model_dir, [prompt], max_new_tokens=n, speculative_algorithm="SPARSESPEC",
                     speculative_num_steps=k, sparsespec_min_selected=MIN_SELECTED,
                     sparsespec_adaptive="on", triton_attention_num_kv_splits=1)[0]
    assert out["output_ids"] == plain[:n]
    # SGLang counts a dense step's k + 1 exact tokens as k accepted drafts: every one "accepted".
    meta = out["meta_info"]
    assert spec_meta(meta, "accepted_drafts") == spec_meta(meta, "proposed_drafts") > 0
