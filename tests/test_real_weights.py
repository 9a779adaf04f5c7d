"""SparseSpec on real trained weights (SmolLM2-135M-Instruct), CPU.

Random-weight models say nothing about selection quality: their attention is flat, so any
selection drafts about as well as any other. With trained weights PillarAttn's verify-score
selection must clearly beat a broken (inverted) one at a budget that binds (K = ceil(s * context)
above the floor), and greedy SparseSpec must still equal plain greedy at every token.
Thresholds come from docs/acceptance.md's measurement of this exact setting, minus a margin.
"""

from __future__ import annotations

import pytest
import torch

from sparsespec_sglang.testing import reference as R

MODEL = "smollm2-135m"
CONTEXT_TOKENS = 1400  # few-shot prompt: K = ceil(0.05 * ~1400) = 70 > the default floor 64
MAX_NEW = 40
CFG = R.SparseSpecConfig()  # the defaults: k=8, s=0.05, min 64, 4 sinks, sum, exact
# Measured on this setting (docs/acceptance.md, "CI setting"; 1303-token prompt, K = 66):
# pillar 5.71 of 8 (7 cycles), window 5.00, inverted 0.63 over 40 tokens. Window is not
# asserted: its gap to pillar (0.7 on 7 cycles) is not stable.
PILLAR_FLOOR = 4.0
INVERTED_TOKENS = 16  # the broken selection accepts ~nothing: each cycle costs k + 1 forwards
INVERTED_GAP = 2.5  # pillar minus inverted must exceed this


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # fastest on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing import prompts as P
    from sparsespec_sglang.testing.real_models import ensure_model

    model_dir = ensure_model(MODEL)
    tok = AutoTokenizer.from_pretrained(model_dir)
    question = P.load_prompts(task="gsm_symbolic")[-1]["question"]
    text = P.few_shot_prompt(tok, None, question, CONTEXT_TOKENS)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    model = R.load_model(model_dir)
    pre = R.prefill(model, prompt)
    plain = R.plain_generate(model, prompt, MAX_NEW, prefilled=pre, ignore_eos=True).tokens
    return model, prompt, pre, plain


def _run(setup, policy="pillar", n=MAX_NEW, **kw):
    model, prompt, pre, plain = setup
    return R.sparsespec_generate(model, prompt, n, CFG, policy=policy, prefilled=pre, ignore_eos=True,
                                 target_tokens=plain, **kw)


def test_budget_binds(setup):
    _, prompt, _, _ = setup
    assert R.num_selected(len(prompt), len(prompt), CFG) > CFG.min_selected


def test_greedy_sparsespec_equals_plain_and_fast_drafts_equal_sequential(setup):
    model, prompt, pre, plain = setup
    fast = _run(setup, trace=True)
    assert fast.tokens == plain
    n = 16  # a few cycles step by step (no guesses): same drafts, acceptance, selections
    seq = R.sparsespec_generate(model, prompt, n, CFG, prefilled=pre, ignore_eos=True, trace=True)
    assert seq.tokens == plain[:n]
    for a, b in zip(seq.cycles, fast.cycles):
        assert (a.position, a.accepted, a.drafts, a.bonus) == (b.position, b.accepted, b.drafts, b.bonus)
        assert torch.equal(a.selection, b.selection)
    # PillarAttn: each cycle after the first drafts over the top-K of the previous verify's scores,
    # and on trained weights those are not simply the most recent tokens.
    window = R.DraftSelection("window")
    not_recent = 0
    for prev, cur in zip(fast.cycles, fast.cycles[1:]):
        top = R.select_topk(prev.scores, CFG.num_sink_tokens, prev.position, cur.num_selected)
        assert torch.equal(cur.selection, top)
        recent = window.select(prev.scores, CFG.num_sink_tokens, prev.position, cur.num_selected)
        not_recent += not torch.equal(cur.selection, recent)
    assert len(fast.cycles) > 3 and not_recent == len(fast.cycles) - 1


def test_pillar_acceptance_floor_and_broken_selection_gap(setup):
    pillar = _run(setup)
    inverted = _run(setup, "inverted", n=INVERTED_TOKENS)
    assert pillar.tokens == setup[3] and inverted.tokens == setup[3][:INVERTED_TOKENS]  # lossless either way
    assert pillar.mean_accepted > PILLAR_FLOOR, pillar.accepted_counts
    assert pillar.mean_accepted - inverted.mean_accepted > INVERTED_GAP, (pillar.accepted_counts,
                                                                          inverted.accepted_counts)
