"""scripts/check_every_token.py's CPU parts: the per-position verdicts on synthetic records, and the
record extraction from meta_info built by the installed SGLang's own logprob post-processing."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import check_every_token as cet  # noqa: E402

THR = 0.25


def _rec(token: int, top1: int, top2: int, gap: float) -> cet.PlainTop2:
    return cet.PlainTop2(token=token, top1=top1, top1_logprob=-0.5, top2=top2, top2_logprob=-0.5 - gap)


def test_wrong_token_after_a_near_tie_is_still_flagged():
    """Position 1 is a legitimate near-tie (top-2, gap 0.1); position 3 is wrong: the check must
    neither stop at the first non-top-1 token nor treat what follows it as out of sync."""
    spec = [10, 21, 30, 99, 50]
    recs = [_rec(10, 10, 11, 3.0), _rec(21, 20, 21, 0.1), _rec(30, 30, 31, 2.0), _rec(99, 40, 41, 5.0),
            _rec(50, 50, 51, 1.0)]
    res = cet.check_positions(spec, recs, THR)
    assert (res["n_positions"], res["n_exact"], res["n_near_tie"], res["n_failing"]) == (5, 3, 1, 1)
    assert [f["pos"] for f in res["near_ties"]] == [1]
    (fail,) = res["failing"]
    assert fail["pos"] == 3 and fail["token"] == 99 and fail["plain_top1"] == 40 and fail["plain_top2"] == 41
    assert fail["reason"] == "not plain's top-2" and fail["gap"] == pytest.approx(5.0)


def test_every_failure_is_listed():
    spec = list(range(100, 140))
    recs = [_rec(t, 1, 2, 9.0) for t in spec]  # every position wrong
    res = cet.check_positions(spec, recs, THR)
    assert res["n_failing"] == 40 and [f["pos"] for f in res["failing"]] == list(range(40))


def test_top2_under_threshold_passes_as_near_tie_and_over_fails():
    under = cet.check_positions([7], [_rec(7, 6, 7, THR - 0.01)], THR)
    assert (under["n_exact"], under["n_near_tie"], under["n_failing"]) == (0, 1, 0)
    over = cet.check_positions([7], [_rec(7, 6, 7, THR + 0.01)], THR)
    assert (over["n_near_tie"], over["n_failing"]) == (0, 1)
    assert over["failing"][0]["reason"] == "top-2 over the tie threshold"
    at = cet.check_positions([7], [_rec(7, 6, 7, THR)], THR)  # "under": the threshold itself fails
    assert at["n_failing"] == 1


def test_misaligned_records_are_refused():
    with pytest.raises(ValueError, match="teacher-forced token"):
        cet.check_positions([1, 2], [_rec(1, 1, 0, 1.0), _rec(3, 3, 0, 1.0)], THR)
    with pytest.raises(ValueError, match="records for"):
        cet.check_positions([1, 2], [_rec(1, 1, 0, 1.0)], THR)


def test_summary_and_verdict_line():
    a = {**cet.check_positions([1, 2], [_rec(1, 1, 0, 1.0), _rec(2, 3, 2, 0.1)], THR), "truncated": False}
    b = {**cet.check_positions([5], [_rec(5, 5, 0, 1.0)], THR), "truncated": True}
    total = cet.summarize([a, b], THR)
    assert (total["n_positions"], total["n_exact"], total["n_near_tie"], total["requests_failing"]) == (3, 2, 1, 1)
    assert cet.summary_line(total, 0, None).startswith("every-token FAIL")
    total_ok = cet.summarize([a], THR)
    assert cet.summary_line(total_ok, 3, None).startswith("every-token PASS")
    det = cet.exact_equality([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 6]])
    assert det["mismatches"] == [{"request": 1, "first_mismatch": 1, "len_plain": 2, "len_spec": 2}]
    assert cet.summary_line(total_ok, 0, det).startswith("every-token FAIL")


def _sglang_meta_info(prompt: list[int], output: list[int], logprobs: torch.Tensor) -> dict:
    """meta_info as the installed SGLang builds it for a prefill of prompt + output with
    logprob_start_len = len(prompt) - 1 and top_logprobs_num = 2, from per-position logprobs
    ``logprobs[p]`` (row p: the distribution at input position len(prompt) - 1 + p)."""
    from sglang.srt.managers.scheduler_components.logprob_result_processor import (
        SchedulerLogprobResultProcessor as Proc,
    )
    from sglang.srt.managers.tokenizer_manager import TokenizerManager as TM
    from sglang.srt.runtime_context import get_context

    ids = prompt + output
    start = len(prompt) - 1
    rows = len(ids) - start
    # The logits processor's raw rows: position p scores input token p + 1 (the last row
    # scores the sampled token; its input id is padded with 0).
    nxt = ids[start + 1:] + [0]
    raw_token = tuple(float(logprobs[p, nxt[p]]) for p in range(rows))
    top = logprobs.topk(2, dim=-1)
    proc = Proc(model_config=SimpleNamespace(vocab_size=logprobs.shape[1] + 10))
    # A generate request (not prefill-only scoring): every position from logprob_start_len on.
    req = SimpleNamespace(origin_input_ids=ids, logprob_start_len=start, is_prefill_only=False,
                          logprob=SimpleNamespace(top_logprobs_num=2, input_top_logprobs_val=None,
                                                  input_top_logprobs_idx=None),
                          temp_input_top_logprobs_val=[top.values.tolist()],
                          temp_input_top_logprobs_idx=[top.indices.tolist()])
    with get_context().override_server_args():  # the scoring-mode check reads the published config
        proc._process_input_token_logprobs(req, list(raw_token))
        proc._process_input_top_logprobs(req)
    tm = SimpleNamespace(detokenize_logprob_tokens=lambda v, i, d: TM.detokenize_logprob_tokens(None, v, i, d))
    return {
        "input_token_logprobs": TM.detokenize_logprob_tokens(
            None, req.logprob.input_token_logprobs_val, req.logprob.input_token_logprobs_idx, False),
        "input_top_logprobs": TM.detokenize_top_logprobs_tokens(
            tm, req.logprob.input_top_logprobs_val, req.logprob.input_top_logprobs_idx, False),
    }


def test_records_from_sglang_meta_info_align_with_output_positions():
    gen = torch.Generator().manual_seed(0)
    vocab, prompt, output = 50, [3, 9, 4, 7], [11, 12, 13, 14, 15, 16]
    logprobs = torch.log_softmax(torch.randn(len(output) + 1, vocab, generator=gen) * 3, dim=-1)
    meta = _sglang_meta_info(prompt, output, logprobs)
    recs = cet.records_from_meta_info(meta, len(output))
    assert [r.token for r in recs] == output
    for i, r in enumerate(recs):  # output token i is predicted at row i (the last prompt token is row 0)
        top = logprobs[i].topk(2)
        assert (r.top1, r.top2) == tuple(top.indices.tolist())
        assert r.top1_logprob == pytest.approx(float(top.values[0]))
        assert r.gap == pytest.approx(float(top.values[0] - top.values[1]))
    with pytest.raises(ValueError, match="expected 6 input logprob rows"):
        cet.records_from_meta_info(meta, len(output) - 1)
    with pytest.raises(ValueError, match="lacks"):
        cet.records_from_meta_info({"input_token_logprobs": []}, 0)


def test_retraction_points_from_the_retraction_patch_log(monkeypatch, caplog):
    from sparsespec_sglang.patches import retraction

    monkeypatch.setattr(retraction, "keeps_retracted_kv", lambda server_args: True)
    monkeypatch.setattr(retraction.offload, "activate", lambda tree_cache: None)
    with caplog.at_level(logging.INFO, logger=retraction.__name__):
        for rid, kv in (("a1", 300), ("b2", 410), ("a1", 777)):
            # The request's kept length under both of SGLang's names for it (renamed in 0.5.21).
            req = SimpleNamespace(rid=rid, effective_kv_committed_len=lambda kv=kv: kv,
                                  owned_kv_len=lambda kv=kv: kv)
            retraction.release_req(lambda *a, **k: None, server_args=None, req=req,
                                   tree_cache=SimpleNamespace(supports_mamba=lambda: False))
    assert cet.retraction_points(caplog.text) == {"a1": [300, 777], "b2": [410]}
    log = "KV cache pool is full. Retract requests. #retracted_reqs: 3, #new_tokens_gained: 9\n" * 2
    assert cet.retraction_summary(log) == {"retraction_events": 2, "retracted_reqs_logged": 6}


# ----------------------------------------------------------------------------- main() wiring

VOCAB = 1000


def _top2(ctx: list[int]) -> list[tuple[float, int, None]]:
    """A deterministic stand-in for plain's distribution: every 5th context length is a near-tie."""
    a = (sum(ctx[-3:]) * 31 + len(ctx)) % VOCAB
    gap = 0.1 if len(ctx) % 5 == 0 else 2.0
    return [(-0.1, a, None), (-0.1 - gap, (a + 1) % VOCAB, None)]


class _FakeEngine:
    """Stands in for sglang.Engine in main(): decodes with _top2 (SPARSESPEC: takes top-2 at
    near-ties, and a wrong token at each (prompt index, position) in ``corrupt``), and answers
    teacher-forcing requests in SGLang's input-logprob layout."""

    corrupt: set = set()
    prompts: list = []
    started: list = []

    def __init__(self, **kwargs):
        import asyncio

        self.kwargs, self.loop = kwargs, asyncio.new_event_loop()
        self.spec = kwargs.get("speculative_algorithm") == "SPARSESPEC"
        _FakeEngine.started.append(kwargs)

    async def async_generate(self, input_ids, sampling_params, **extra):
        i = _FakeEngine.prompts.index(list(input_ids))
        ctx, out = list(input_ids), []
        for pos in range(sampling_params["max_new_tokens"]):
            (lp1, t1, _), (lp2, t2, _) = _top2(ctx)
            tok = t2 if self.spec and lp1 - lp2 < 0.25 else t1
            if self.spec and (i, pos) in _FakeEngine.corrupt:
                tok = (t1 + 7) % VOCAB
            ctx.append(tok)
            out.append(tok)
        return {"output_ids": out, "meta_info": {"id": f"rid{i}", "finish_reason": {"type": "length"},
                                                 "num_retractions": 0}}

    def generate(self, input_ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num):
        assert return_logprob and top_logprobs_num == 2 and sampling_params["max_new_tokens"] == 1
        res = []
        for ids, start in zip(input_ids, logprob_start_len):
            tok = [(None, ids[start], None)]
            top = [None]
            for p in range(start + 1, len(ids)):
                t2 = _top2(ids[:p])
                tok.append((next((lp for lp, t, _ in t2 if t == ids[p]), -9.0), ids[p], None))
                top.append(t2)
            res.append({"output_ids": [0], "meta_info": {"input_token_logprobs": tok, "input_top_logprobs": top}})
        return res

    def shutdown(self):
        self.loop.close()


def _run_main(monkeypatch, tmp_path, corrupt, *extra):
    import json

    import sglang

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = make_model_dir(tmp_path / "tok", "tiny", with_weights=False)
    prompts_file = tmp_path / "p.jsonl"
    prompts_file.write_text("".join(json.dumps({"id": i, "task": "t", "question": q, "answer": "1", "solution": None})
                                    + "\n" for i, q in enumerate(["what is 1+1?", "name a prime", "count to 3"])))
    tok = __import__("transformers").AutoTokenizer.from_pretrained(model_dir)
    from sparsespec_sglang.testing.prompts import chat_prompt

    _FakeEngine.prompts = [tok(chat_prompt(tok, q), add_special_tokens=False)["input_ids"]
                           for q in ["what is 1+1?", "name a prime", "count to 3", "what is 1+1?"]]
    _FakeEngine.corrupt, _FakeEngine.started = set(corrupt), []
    monkeypatch.setattr(sglang, "Engine", _FakeEngine)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    out = tmp_path / "et.json"
    monkeypatch.setattr(sys, "argv", ["check_every_token.py", "--model-dir", str(model_dir), "--prompts",
                                      str(prompts_file), "--num-prompts", "4", "--max-new-tokens", "40",
                                      "--quiet", "--out", str(out), *extra])
    rc = cet.main()
    return rc, json.loads(out.read_text())


def test_main_wiring_passes_clean_outputs_and_counts_near_ties(monkeypatch, tmp_path):
    rc, report = _run_main(monkeypatch, tmp_path, set(), "--schedule", "lockstep")
    s = report["summary"]
    assert rc == 0 and s["n_positions"] == 160 and s["n_failing"] == 0 and s["n_near_tie"] > 0
    assert s["n_exact"] + s["n_near_tie"] == 160 and report["deterministic_exact"] is None
    assert _FakeEngine.started[0]["sparsespec_schedule"] == "lockstep"
    assert _FakeEngine.started[1]["attention_backend"] == "triton" and _FakeEngine.started[1]["disable_radix_cache"]
    assert not _FakeEngine.started[0]["disable_radix_cache"]


def test_main_deterministic_requires_exact_equality(monkeypatch, tmp_path):
    """The fake SPARSESPEC takes plain's top-2 at near-ties: fine up to ties, not in deterministic mode."""
    rc, report = _run_main(monkeypatch, tmp_path, set(), "--deterministic")
    assert report["summary"]["n_failing"] == 0 and report["summary"]["n_near_tie"] > 0
    assert rc == 1 and report["deterministic_exact"]["num_mismatched"] == 4
    assert all(kw["enable_deterministic_inference"] for kw in _FakeEngine.started) and len(_FakeEngine.started) == 2


def test_main_wiring_flags_a_corrupted_position_after_near_ties(monkeypatch, tmp_path):
    rc, report = _run_main(monkeypatch, tmp_path, {(2, 33)})
    assert rc == 1 and report["summary"]["n_failing"] == 1 and report["summary"]["requests_failing"] == 1
    (fail,) = report["requests"][2]["failing"]
    assert fail["pos"] == 33 and fail["reason"] == "not plain's top-2"
    assert report["requests"][2]["n_near_tie"] > 0 and report["requests"][2]["rid"] == "rid2"


def test_a_token_tied_with_the_top_beyond_top2_is_a_near_tie_and_a_far_one_fails():
    """Three-way tie: plain lists two of the tied tokens as its top-2, SPARSESPEC picked the third;
    its own plain logprob (input_token_logprobs) shows the tie. The same token 3 nats down fails."""
    tied = cet.PlainTop2(token=9, top1=1, top1_logprob=-1.0, top2=2, top2_logprob=-1.0, token_logprob=-1.0)
    far = cet.PlainTop2(token=9, top1=1, top1_logprob=-1.0, top2=2, top2_logprob=-1.0, token_logprob=-4.0)
    res = cet.check_positions([9, 9], [tied, far], tie_threshold=0.25)
    assert res["n_near_tie"] == 1 and res["near_ties"][0]["kind"] == "tie beyond top-2"
    assert [f["pos"] for f in res["failing"]] == [1]
    assert res["failing"][0]["token_gap"] == pytest.approx(3.0)


@pytest.mark.parametrize("token_gap, passes", [(THR - 0.01, True), (THR, False), (THR + 0.01, False), (0.5, False)])
def test_a_token_beyond_top2_passes_only_strictly_under_the_tie_threshold(token_gap, passes):
    """The tie rule beyond plain's top-2 uses the same threshold as the top-2 rule, at its boundary:
    a token a few tenths of a nat below plain's top-1 is a wrong token, not a tie."""
    rec = cet.PlainTop2(token=9, top1=1, top1_logprob=-1.0, top2=2, top2_logprob=-1.0,
                        token_logprob=-1.0 - token_gap)
    res = cet.check_positions([9], [rec], tie_threshold=THR)
    assert (res["n_near_tie"], res["n_failing"]) == ((1, 0) if passes else (0, 1))
