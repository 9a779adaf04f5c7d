"""CPU tests of the PyTorch SparseSpec reference (sparsespec_sglang/testing/reference.py).

All on a tiny random Qwen3 built by sparsespec_sglang.testing.model_dirs (float32).
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang.testing import reference as R
from sparsespec_sglang.testing.model_dirs import make_model_dir

MAX_NEW = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model's ops are far too small to gain from intra-op threads; one thread keeps
    # the runtime stable on a busy 2-core machine. Restored for other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "model", "tiny", seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    torch.manual_seed(0)
    return R.load_model(model_dir)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1234)
    # Byte tokens only (ids 3..258), never the EOS id 2.
    return [torch.randint(3, 259, (n,), generator=g).tolist() for n in (6, 33, 80)]


@pytest.fixture(scope="module")
def plain(model, prompts):
    """Plain greedy outputs (no EOS stop) for every prompt."""
    return [R.plain_generate(model, p, MAX_NEW, ignore_eos=True).tokens for p in prompts]


def _hf(model_dir, impl):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl).eval()


# ----------------------------------------------------------------------------- plain decoding


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_plain_greedy_matches_hf_generate(model_dir, model, prompts, plain, impl):
    hf = _hf(model_dir, impl)
    for p, ref in zip(prompts, plain):
        ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert ids == ref
    # With EOS stopping: pick a token from the middle of an output as the EOS id.
    p, ref = prompts[1], plain[1]
    eos = ref[10]
    stop = ref.index(eos)
    ids = hf.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)[0, len(p):].tolist()
    out = R.plain_generate(model, p, MAX_NEW, eos_token_id=eos)
    assert out.tokens == ids == ref[: stop + 1]
    assert out.finish_reason == "stop"
    # prepare_model() switches an already loaded model to the reference attention.
    R.prepare_model(hf)
    assert hf.config._attn_implementation == R.ATTN_IMPLEMENTATION
    assert R.sparsespec_generate(hf, p, MAX_NEW, k=4, sparsity=0.3, min_sel=1, ignore_eos=True).tokens == ref


def test_tiny_model_has_no_near_ties(model, prompts, plain):
    """The tiny model is built to be peaky: greedy margins are far above float32 noise."""
    for p, ref in zip(prompts, plain):
        logits = R._forward(model, R._new_cache(model), p + ref[:-1], 0, R._AttnState())[len(p) - 1:]
        top2 = logits.topk(2, dim=-1).values
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-3


# ----------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("k,sparsity,num_sink,aggregation",
                         list(itertools.product([1, 4, 8], [0.05, 0.5, 1.0], [0, 4], ["sum", "max"])))
def test_greedy_lossless(model, prompts, plain, k, sparsity, num_sink, aggregation):
    for p, ref in zip(prompts, plain):
        out = R.sparsespec_generate(model, p, MAX_NEW, k=k, sparsity=sparsity, min_sel=1, max_sel=4096,
                                    num_sink=num_sink, aggregation=aggregation, ignore_eos=True)
        assert out.tokens == ref
        assert out.finish_reason == "length"
        assert all(0 <= c.accepted <= k for c in out.cycles)
        # Every output token after the first comes from exactly one cycle.
        assert sum(c.committed for c in out.cycles) == len(ref) - 1


def test_draft_normalised_scores_stay_lossless_and_change_the_scores(model, prompts, plain):
    kw = dict(k=4, sparsity=0.05, min_sel=1, num_sink=2, ignore_eos=True, trace=True)
    for p, ref in zip(prompts, plain):
        exact = R.sparsespec_generate(model, p, MAX_NEW, score_norm="exact", **kw)
        draft = R.sparsespec_generate(model, p, MAX_NEW, score_norm="draft", **kw)
        assert exact.tokens == draft.tokens == ref
    # Same first cycle (window selection, same drafts): only the row normaliser differs.
    first_exact, first_draft = exact.cycles[0].scores, draft.cycles[0].scores
    assert first_exact.shape == first_draft.shape
    assert not torch.allclose(first_exact, first_draft)


def test_verify_scores_with_the_true_row_lse_equal_exact_scores():
    torch.manual_seed(3)
    hq, hkv, q_len, kv_len, d = 4, 2, 3, 10, 8
    module = SimpleNamespace(layer_idx=0)
    q, key, value = torch.randn(1, hq, q_len, d), torch.randn(1, hkv, kv_len, d), torch.randn(1, hkv, kv_len, d)
    exact = R._AttnState("verify")
    R.pillar_attention(module, q, key, value, sparsespec_state=exact)
    # The rows' own lse, computed independently (causal: row i sees positions <= kv_len - q_len + i).
    logits = torch.einsum("hqd,hkd->hqk", q[0], key[0].repeat_interleave(hq // hkv, 0)) * d ** -0.5
    visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
    lse = torch.logsumexp(logits.masked_fill(~visible, float("-inf")), dim=-1)  # [Hq, q_len]
    given = R._AttnState("verify", row_lse={0: [lse[:, i] for i in range(q_len)]})
    R.pillar_attention(module, q, key, value, sparsespec_state=given)
    torch.testing.assert_close(given.scores[0], exact.scores[0], rtol=1e-5, atol=1e-6)


def test_greedy_lossless_default_config_and_duck_typed_config(model, prompts, plain):
    cfg = SimpleNamespace(num_draft_steps=4, sparsity=0.1, min_selected=2, max_selected=16,
                          num_sink_tokens=2, aggregation="max", unrelated_field=123)
    for p, ref in zip(prompts, plain):
        assert R.sparsespec_generate(model, p, MAX_NEW, ignore_eos=True).tokens == ref
        out = R.sparsespec_generate(model, p, MAX_NEW, cfg, ignore_eos=True)
        assert out.tokens == ref
        assert out.config == R.SparseSpecConfig(4, 0.1, 2, 16, 2, "max")
        assert all(c.num_selected <= 16 for c in out.cycles)


@pytest.mark.parametrize("k,sparsity", [(4, 1.0), (4, 0.05), (8, 0.05), (1, 0.05)])
def test_eos_and_max_new_tokens_stop_mid_cycle(model, prompts, plain, k, sparsity):
    p, ref = prompts[1], plain[1]
    kw = dict(k=k, sparsity=sparsity, min_sel=1, num_sink=4)
    # EOS = the token at output index 7, first occurrence (index 7 is mid-cycle for k=4 dense:
    # prefill emits index 0, cycles emit 1-5, 6-10, ...).
    i = next(i for i in range(7, len(ref)) if ref[i] not in ref[:i])
    eos = ref[i]
    out = R.sparsespec_generate(model, p, MAX_NEW, eos_token_id=[eos], **kw)
    assert out.tokens == ref[: i + 1] == R.plain_generate(model, p, MAX_NEW, eos_token_id=eos).tokens
    assert out.finish_reason == "stop"
    for n in (1, 2, 8, 9):
        out = R.sparsespec_generate(model, p, n, ignore_eos=True, **kw)
        assert out.tokens == ref[:n]
        assert out.finish_reason == "length"
    if sparsity == 1.0:
        # Dense drafts: every cycle accepts all k, so the stops above cut cycles short.
        out = R.sparsespec_generate(model, p, MAX_NEW, eos_token_id=eos, **kw)
        assert out.cycles[-1].accepted == k and out.cycles[-1].committed < k + 1
        out = R.sparsespec_generate(model, p, 8, ignore_eos=True, **kw)
        assert out.cycles[-1].committed < out.cycles[-1].accepted + 1
    assert R.sparsespec_generate(model, p, 0, **kw).tokens == []


def test_first_token_eos_stops_after_prefill(model, prompts, plain):
    out = R.sparsespec_generate(model, prompts[0], MAX_NEW, eos_token_id=plain[0][0], k=4)
    assert out.tokens == plain[0][:1] and out.cycles == [] and out.finish_reason == "stop"


# ----------------------------------------------------------------------------- draft quality


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("num_sink", [0, 4])
def test_dense_drafts_accept_everything(model, prompts, plain, k, num_sink):
    """sparsity 1.0 -> the selection covers every candidate -> the draft forward IS the full
    model, so every cycle accepts all k drafts."""
    for p, ref in zip(prompts, plain):
        out = R.sparsespec_generate(model, p, MAX_NEW, k=k, sparsity=1.0, min_sel=0, max_sel=10**6,
                                    num_sink=num_sink, ignore_eos=True)
        assert out.tokens == ref
        assert [c.accepted for c in out.cycles] == [k] * len(out.cycles)
        # With the defaults (min_selected=64) a short context is fully selected as well.
    out = R.sparsespec_generate(model, prompts[1], MAX_NEW, k=k, ignore_eos=True)
    assert out.accepted_counts == [k] * len(out.cycles)


def test_sparse_drafts_are_lossless_but_accept_less(model, prompts, plain):
    k = 8
    for p, ref in zip(prompts[1:], plain[1:]):
        sparse = R.sparsespec_generate(model, p, MAX_NEW, k=k, sparsity=0.05, min_sel=1, num_sink=4,
                                       ignore_eos=True, trace=True)
        assert sparse.tokens == ref
        assert sparse.mean_accepted < 0.5 * k
        assert len(sparse.cycles) > math.ceil((len(ref) - 1) / (k + 1))
        assert all(c.num_selected < c.dense_start - 4 for c in sparse.cycles)


# ----------------------------------------------------------------------------- selection


def test_num_selected_clamping():
    cfg = R.SparseSpecConfig(sparsity=0.05, min_selected=64, max_selected=2048)
    assert R.num_selected(1000, 10**6, cfg) == 64  # floor
    assert R.num_selected(2000, 10**6, cfg) == 100  # ceil(0.05 * 2000)
    assert R.num_selected(2001, 10**6, cfg) == 101  # ceil(100.05)
    assert R.num_selected(10**6, 10**6, cfg) == 2048  # cap
    assert R.num_selected(1000, 30, cfg) == 30  # #candidates
    assert R.num_selected(1000, 0, cfg) == 0
    cfg = R.SparseSpecConfig(sparsity=0.07, min_selected=0, max_selected=10**6)
    assert R.num_selected(100, 10**6, cfg) == 7  # 0.07 * 100 = 7.000000000000001 in float
    assert R.num_selected(1, 10**6, cfg) == 1
    with pytest.raises(ValueError):
        R.SparseSpecConfig(min_selected=10, max_selected=5)
    with pytest.raises(ValueError):
        R.SparseSpecConfig(aggregation="mean")
    with pytest.raises(TypeError):
        R.resolve_config(bogus=1)
    assert R.resolve_config(R.SparseSpecConfig(sparsity=0.2), k=3, num_sink=0) == R.SparseSpecConfig(
        num_draft_steps=3, sparsity=0.2, num_sink_tokens=0)


def test_select_topk_ties_sinks_and_order():
    scores = torch.tensor([[9.0, 9.0, 1.0, 5.0, 5.0, 5.0, 0.0, 7.0, 100.0, 100.0]])
    # sinks [0, 2) and positions >= 8 are never candidates; ties (5, 5, 5) go to lower positions.
    assert R.select_topk(scores, 2, 8, 3).tolist() == [[3, 4, 7]]
    assert R.select_topk(scores, 2, 8, 2).tolist() == [[3, 7]]
    assert R.select_topk(scores, 2, 8, 100).tolist() == [[2, 3, 4, 5, 6, 7]]
    assert R.select_topk(scores, 0, 8, 1).tolist() == [[0]]
    assert R.select_topk(scores, 9, 8, 3).shape == (1, 0)
    s3 = torch.rand(2, 3, 50)
    sel = R.select_topk(s3, 4, 40, 5)
    assert sel.shape == (2, 3, 5)
    for l, h in itertools.product(range(2), range(3)):
        assert sel[l, h].tolist() == sorted((torch.topk(s3[l, h, 4:40], 5).indices + 4).tolist())


def test_window_selection():
    sel = R.window_selection(2, 3, 20, 4, 5)
    assert sel.shape == (2, 3, 5) and (sel == torch.arange(15, 20)).all()
    assert R.window_selection(1, 1, 6, 4, 5).tolist() == [[[4, 5]]]  # clipped at the sinks


def test_aggregate_scores_gqa_grouping():
    probs = torch.zeros(4, 2, 5)  # 4 q heads, 2 kv heads -> group of 2
    probs[0, 0, 1] = 1.0  # q head 0 -> kv head 0
    probs[1, 1, 2] = 0.5  # q head 1 -> kv head 0
    probs[1, 0, 2] = 0.25
    probs[2, 0, 3] = 1.0  # q head 2 -> kv head 1
    s = R.aggregate_scores(probs, 2, "sum")
    assert s.tolist() == [[0, 1.0, 0.75, 0, 0], [0, 0, 0, 1.0, 0]]
    m = R.aggregate_scores(probs, 2, "max")
    assert m.tolist() == [[0, 1.0, 0.5, 0, 0], [0, 0, 0, 1.0, 0]]


def test_draft_key_mask_and_sparse_attention_against_naive_loop():
    torch.manual_seed(0)
    hq, hkv, d, kv_len = 4, 2, 8, 30
    sel = torch.tensor([[5, 9, 12], [6, 7, 20]])
    mask = R.draft_key_mask(kv_len, 4, 22, sel)
    expect = torch.zeros(hkv, kv_len, dtype=torch.bool)
    expect[:, :4] = True
    expect[:, 22:] = True
    expect[0, [5, 9, 12]] = True
    expect[1, [6, 7, 20]] = True
    assert torch.equal(mask, expect)
    no_sel = sel[:, :0]
    assert R.draft_key_mask(10, 4, 6, no_sel).tolist() == [[True] * 4 + [False] * 2 + [True] * 4] * 2
    assert R.draft_key_mask(10, 2, 6, no_sel).tolist() == [[True] * 2 + [False] * 4 + [True] * 4] * 2
    assert R.draft_key_mask(10, 0, 6, no_sel).tolist() == [[False] * 6 + [True] * 4] * 2

    q = torch.randn(1, hq, 1, d)
    k = torch.randn(1, hkv, kv_len, d)
    v = torch.randn(1, hkv, kv_len, d)
    module = SimpleNamespace(layer_idx=1)
    st = R._AttnState("draft", num_sink=4, dense_start=22, selection=torch.stack([sel * 0, sel]))
    out, _ = R.pillar_attention(module, q, k, v, None, scaling=d ** -0.5, sparsespec_state=st)
    for h in range(hq):
        keep = expect[h // 2].nonzero().flatten()
        w = torch.softmax((q[0, h, 0] @ k[0, h // 2, keep].T) * d ** -0.5, -1)
        torch.testing.assert_close(out[0, 0, h], w @ v[0, h // 2, keep])


def test_selection_wiring_and_window_first_cycle(model, prompts):
    k, num_sink = 4, 4
    cfg = R.SparseSpecConfig(num_draft_steps=k, sparsity=0.1, min_selected=3, max_selected=6, num_sink_tokens=num_sink)
    p = prompts[2]
    L = len(p)
    out = R.sparsespec_generate(model, p, MAX_NEW, cfg, ignore_eos=True, trace=True)
    c0 = out.cycles[0]
    k0 = R.num_selected(L, L - num_sink, cfg)
    assert c0.dense_start == L and c0.position == L and c0.num_selected == k0 == 6
    assert (c0.selection == torch.arange(L - k0, L)).all()
    for prev, cur in zip(out.cycles, out.cycles[1:]):
        assert cur.position == prev.position + prev.accepted + 1
        assert cur.dense_start == prev.position
        n = R.num_selected(cur.position, prev.position - num_sink, cfg)  # context_len = P + m + 1
        assert cur.num_selected == n == min(max(math.ceil(0.1 * cur.position), 3), 6)
        assert torch.equal(cur.selection, R.select_topk(prev.scores, num_sink, prev.position, n))
        assert ((cur.selection >= num_sink) & (cur.selection < cur.dense_start)).all()


@pytest.mark.parametrize("aggregation", ["sum", "max"])
def test_verify_scores_match_eager_attention(model_dir, model, prompts, aggregation):
    """Scores recomputed independently from transformers' eager attention weights."""
    hf = _hf(model_dir, "eager")
    cfg = hf.config
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    k = 4
    p = prompts[1]
    out = R.sparsespec_generate(model, p, 20, k=k, sparsity=0.2, min_sel=1, aggregation=aggregation,
                                ignore_eos=True, trace=True)
    L = len(p)
    for c in out.cycles:
        P = c.position
        seq = p + out.tokens[: P - L + 1] + c.drafts  # committed prefix incl. pending, then drafts
        assert len(seq) == P + k + 1 == c.scores.shape[-1]
        with torch.no_grad():
            att = hf(torch.tensor([seq]), output_attentions=True).attentions
        for layer, a in enumerate(att):
            rows = a[0, :, P:, :]  # [Hq, k+1, T]
            g = rows.reshape(cfg.num_key_value_heads, group, k + 1, -1)
            ref = g.sum((1, 2)) if aggregation == "sum" else g.amax((1, 2))
            torch.testing.assert_close(c.scores[layer], ref, atol=1e-5, rtol=1e-4)
        if aggregation == "sum":
            # Each softmax row sums to 1: total mass = (k+1) rows * group heads.
            torch.testing.assert_close(c.scores.sum(-1), torch.full(c.scores.shape[:2], float((k + 1) * group)))
        else:
            assert (c.scores <= 1 + 1e-6).all() and (c.scores.amax(-1) >= 1.0 / (P + k + 1)).all()


# ----------------------------------------------------------------------------- sampling


def test_sampling_probs_filters():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    torch.testing.assert_close(R.sampling_probs(logits, 1.0), torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    torch.testing.assert_close(R.sampling_probs(logits, 1.0, top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top_p 0.6: 0.5 alone < 0.6, so 0.2 is kept too; 0.15 is dropped (0.7 > 0.6 before it).
    torch.testing.assert_close(R.sampling_probs(logits, 1.0, top_p=0.6), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    torch.testing.assert_close(R.sampling_probs(logits, 1.0, top_k=3, top_p=0.99),
                               torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    hot = R.sampling_probs(logits, 1e6)
    torch.testing.assert_close(hot, torch.full((5,), 0.2), atol=1e-5, rtol=0)


def _random_dist(g, v, sparse=False):
    x = torch.rand(v, generator=g, dtype=torch.float64) ** 3
    if sparse:
        x[torch.randint(v, (1,), generator=g)] = 0.0
    return x / x.sum()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_sampling_rule_is_exact(k, seed):
    """Enumerate every draft sequence and accept/reject outcome of one cycle (prefix-dependent
    p and q, some zero entries) and continue with the exact target afterwards: the distribution
    of the first k+1 output tokens must equal the target's, to float64 precision."""
    V = 3
    g = torch.Generator().manual_seed(seed)
    tables: dict = {}

    def dist(kind, prefix):
        key = (kind, prefix)
        if key not in tables:
            tables[key] = _random_dist(g, V, sparse=(len(prefix) + seed) % 2 == 0)
        return tables[key]

    target = lambda prefix: dist("p", prefix)  # noqa: E731
    draft = lambda prefix: dist("q", prefix)  # noqa: E731
    T = k + 1
    got: dict = {}

    def emit(prefix, prob):
        """prefix already emitted with probability prob; continue with the exact target."""
        if len(prefix) == T:
            got[prefix] = got.get(prefix, 0.0) + prob
            return
        pt = target(prefix)
        for y in range(V):
            if pt[y] > 0:
                emit(prefix + (y,), prob * float(pt[y]))

    for ds in itertools.product(range(V), repeat=k):
        qs = [draft(ds[:j]) for j in range(k)]
        prob_d = math.prod(float(qs[j][ds[j]]) for j in range(k))
        if prob_d == 0:
            continue
        p = torch.stack([target(ds[:j]) for j in range(k + 1)])
        q = torch.stack(qs)
        acc = R.acceptance_probabilities(p, q, ds)
        reach = 1.0
        for m in range(k + 1):
            if m < k:
                w = reach * (1 - float(acc[m]))  # accept d_1..d_m, reject d_{m+1}
                nxt = R.residual_distribution(p[m], q[m])
            else:
                w, nxt = reach, p[k]
            for y in range(V):
                if w * float(nxt[y]) > 0:
                    emit(tuple(ds[:m]) + (y,), prob_d * w * float(nxt[y]))
            if m < k:
                reach *= float(acc[m])

    want: dict = {}

    def exact(prefix, prob):
        if len(prefix) == T:
            want[prefix] = prob
            return
        pt = target(prefix)
        for y in range(V):
            if pt[y] > 0:
                exact(prefix + (y,), prob * float(pt[y]))

    exact((), 1.0)
    keys = set(got) | set(want)
    assert max(abs(got.get(x, 0.0) - want.get(x, 0.0)) for x in keys) < 1e-12
    assert abs(sum(got.values()) - 1) < 1e-12


def test_speculative_accept_uses_the_rule():
    g = torch.Generator().manual_seed(5)
    for _ in range(200):
        k, V = 4, 6
        p = torch.stack([_random_dist(g, V, sparse=True) for _ in range(k + 1)])
        q = torch.stack([_random_dist(g, V) for _ in range(k)])
        ds = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(k)]
        acc = R.acceptance_probabilities(p, q, ds)
        torch.testing.assert_close(acc, torch.clamp(p[torch.arange(k), ds] / q[torch.arange(k), ds], max=1.0))
        u = torch.rand(k, generator=g, dtype=torch.float64)
        m, nxt = R.speculative_accept(p, q, ds, u)
        want_m = next((j for j in range(k) if u[j] >= acc[j]), k)
        assert m == want_m
        want = p[k] if m == k else torch.clamp(p[m] - q[m], min=0) / torch.clamp(p[m] - q[m], min=0).sum()
        torch.testing.assert_close(nxt, want)
    # The boundary: u just below / at the acceptance probability.
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.4, 0.6]], dtype=torch.float64)
    assert R.speculative_accept(p, q, [0], torch.tensor([0.4999]))[0] == 1
    assert R.speculative_accept(p, q, [0], torch.tensor([0.5]))[0] == 0


def _exact_target(model, prompt, n, temperature, top_k):
    """Exact joint target distribution of the first n sampled tokens (by enumeration)."""
    res = {}

    def rec(prefix, prob):
        if len(prefix) == n:
            res[prefix] = prob
            return
        logits = R._forward(model, R._new_cache(model), prompt + list(prefix), 0, R._AttnState())[-1]
        pr = R.sampling_probs(logits, temperature, top_k)
        for y in pr.nonzero().flatten().tolist():
            rec(prefix + (y,), prob * float(pr[y]))

    rec((), 1.0)
    return res


def _chi2(counts: dict, expect: dict, n: int) -> float:
    small = [x for x in expect if expect[x] * n < 5]
    obs_small = sum(counts.get(x, 0) for x in small)
    exp_small = sum(expect[x] for x in small) * n
    stat = sum((counts.get(x, 0) - expect[x] * n) ** 2 / (expect[x] * n) for x in expect if x not in small)
    if exp_small > 0:
        stat += (obs_small - exp_small) ** 2 / exp_small
    stat += 1e9 * sum(c for x, c in counts.items() if x not in expect)  # outside the support
    return stat


def test_speculative_sampling_end_to_end_matches_target(model, prompts, monkeypatch):
    """Seeded runs of sparse self-speculative sampling vs the exact target distribution of the
    first 3 tokens (top_k=3 -> at most 27 outcomes). The setting (6-token prompt, s=0.5,
    2 sinks) gives a mix of full acceptances and rejections (mean ~1.2 of 2 accepted), and
    q != p, so a wrong rule shows: the same harness with an always-accept rule must fail."""
    p = prompts[0]
    n_tok, temp, top_k, k = 3, 3.0, 3, 2
    expect = _exact_target(model, p, n_tok, temp, top_k)
    gen = torch.Generator().manual_seed(0)

    def run(n):
        counts: dict = {}
        acc = []
        for _ in range(n):
            out = R.sparsespec_generate(model, p, n_tok, k=k, sparsity=0.5, min_sel=1, num_sink=2,
                                        temperature=temp, top_k=top_k, generator=gen, ignore_eos=True)
            counts[tuple(out.tokens)] = counts.get(tuple(out.tokens), 0) + 1
            acc += out.accepted_counts
        return counts, sum(acc) / len(acc)

    n = 1200
    counts, mean_acc = run(n)
    # chi-square with <= 27 bins: mean ~26, sd ~7; 80 is beyond p = 1e-6.
    assert _chi2(counts, expect, n) < 80
    assert 0.5 < mean_acc < k - 0.5  # drafts are often accepted and often rejected

    monkeypatch.setattr(R, "acceptance_probabilities", lambda p_, q_, d_: torch.ones(len(d_), dtype=torch.float64))
    bad_counts, _ = run(400)
    assert _chi2(bad_counts, expect, 400) > 80


# ----------------------------------------------------------------------------- fast paths


def _cycle_trace(out):
    return [(c.position, c.accepted, c.drafts, c.bonus, c.num_selected) for c in out.cycles]


@pytest.mark.parametrize("k,score_norm", [(4, "exact"), (8, "exact"), (8, "draft"), (16, "draft")])
def test_teacher_forced_drafts_equal_sequential_drafts(model, prompts, plain, k, score_norm):
    """Drafting a cycle in one teacher-forced forward (given the target's output, a wrong guess,
    or a partly right one) gives exactly the step-by-step drafts, KV, selections and scores."""
    g = torch.Generator().manual_seed(7)
    kw = dict(k=k, sparsity=0.7, min_sel=2, num_sink=2, score_norm=score_norm, ignore_eos=True, trace=True)
    accepted, cycles = 0, 0
    for p, ref in zip(prompts, plain):
        seq = R.sparsespec_generate(model, p, MAX_NEW, **kw)
        accepted, cycles = accepted + sum(seq.accepted_counts), cycles + len(seq.cycles)
        wrong = torch.randint(3, 259, (MAX_NEW,), generator=g).tolist()
        half = [t if i % 3 else w for i, (t, w) in enumerate(zip(ref, wrong))]
        for guess in (ref, wrong, half, ref[:5]):
            fast = R.sparsespec_generate(model, p, MAX_NEW, target_tokens=guess, **kw)
            assert fast.tokens == seq.tokens == ref
            assert _cycle_trace(fast) == _cycle_trace(seq)
            for a, b in zip(fast.cycles, seq.cycles):
                assert torch.equal(a.selection, b.selection)
                torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert 0 < accepted < k * cycles  # misses and hits both exercised


def test_teacher_forced_path_runs_fewer_forwards(model, prompts, plain, monkeypatch):
    calls = []
    real = R._forward
    monkeypatch.setattr(R, "_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(k=8, sparsity=0.7, min_sel=2, num_sink=2, ignore_eos=True)
    seq = R.sparsespec_generate(model, prompts[2], MAX_NEW, **kw)
    longer = R.plain_generate(model, prompts[2], MAX_NEW + 16, ignore_eos=True).tokens  # guesses past the end
    n_seq, calls[:] = len(calls) - (MAX_NEW + 16), []
    fast = R.sparsespec_generate(model, prompts[2], MAX_NEW, target_tokens=longer, **kw)
    assert fast.accepted_counts == seq.accepted_counts and sum(seq.accepted_counts) > 0
    # Per cycle at most: one forward fixing the m + 1 drafts up to the first miss, one per draft
    # after it, one verify (the prefill once); step by step: k drafts and a verify.
    bound = 1 + sum(1 + (8 - min(c.accepted + 1, 8)) + 1 for c in seq.cycles)
    assert len(calls) <= bound < n_seq == 1 + 9 * len(seq.cycles)


def test_prefill_reuse(model, prompts, plain):
    p = prompts[1]
    pre = R.prefill(model, p)
    n = pre.cache.get_seq_length()
    assert R.plain_generate(model, p, MAX_NEW, ignore_eos=True, prefilled=pre).tokens == plain[1]
    out = R.sparsespec_generate(model, p, MAX_NEW, k=4, sparsity=0.2, min_sel=1, ignore_eos=True, prefilled=pre)
    assert out.tokens == plain[1] and pre.cache.get_seq_length() == n == len(p)  # not consumed
    with pytest.raises(ValueError, match="another prompt"):
        R.plain_generate(model, prompts[0], 4, prefilled=pre)


# ----------------------------------------------------------------------------- selection policies


def test_policy_selections():
    scores = torch.tensor([[9.0, 9.0, 0.1, 5.0, 0.2, 4.0, 0.3, 3.0, 0.0, 7.0]])
    sel = lambda name, k, end=10: R.DraftSelection.parse(name).select(scores, 2, end, k,  # noqa: E731
                                                                        torch.Generator().manual_seed(0))
    assert sel("pillar", 3).tolist() == [[3, 5, 9]]
    assert sel("inverted", 3).tolist() == [[2, 4, 8]]
    assert sel("window", 3).tolist() == [[7, 8, 9]]
    assert sel("window", 3, end=4).tolist() == [[2, 3]]  # clipped at the sinks
    assert sel("hybrid:0.5", 4).tolist() == [[3, 5, 8, 9]]  # 2 recent + top 2 of [2, 8)
    assert sel("hybrid:0", 3).tolist() == sel("pillar", 3).tolist()
    assert sel("hybrid:1", 3).tolist() == sel("window", 3).tolist()
    r = sel("random", 4)
    assert r.shape == (1, 4) and len(set(r[0].tolist())) == 4 and ((r >= 2) & (r < 10)).all()
    assert torch.equal(r, sel("random", 4)) and (r[0] == r[0].sort().values).all()
    many = R.DraftSelection("random").select(torch.zeros(2, 3, 100), 4, 100, 10, torch.Generator().manual_seed(1))
    assert len({tuple(x) for x in many.reshape(6, 10).tolist()}) == 6  # independent per (layer, head)
    assert R.DraftSelection.parse("hybrid:0.25").label == "hybrid:0.25"
    for bad in ("top", "hybrid:2", "hybrid:x", "window:3", "random:x"):
        with pytest.raises(ValueError, match="selection policy"):
            R.DraftSelection.parse(bad)


@pytest.mark.parametrize("policy", ["window", "random", "inverted", "hybrid:0.5"])
def test_policies_are_lossless_and_wired(model, prompts, plain, policy):
    pol = R.DraftSelection.parse(policy)
    cfg = R.SparseSpecConfig(num_draft_steps=4, sparsity=0.1, min_selected=3, max_selected=6, num_sink_tokens=2)
    for p, ref in zip(prompts, plain):
        rng = torch.Generator().manual_seed(pol.seed)  # each generation seeds its own
        out = R.sparsespec_generate(model, p, MAX_NEW, cfg, policy=policy, ignore_eos=True, trace=True,
                                    target_tokens=ref)
        assert out.tokens == ref
        for prev, cur in zip(out.cycles, out.cycles[1:]):
            expect = pol.select(prev.scores, 2, prev.position, cur.num_selected, rng)
            assert torch.equal(cur.selection, expect)


# ----------------------------------------------------------------------------- adaptive split (auto)

_AUTO_SHAPE, _AUTO_SINK, _AUTO_K, _AUTO_STEP = (2, 3), 4, 32, 5


def _recent_scores(P: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Verify scores [2, 3, P + k + 1] whose mass sits on the most recent positions (decaying with
    distance), plus 16 spikes per (layer, head) at old positions drawn anew each verify: the
    previous verify's top scores point at old tokens the next verify no longer attends to."""
    T = P + k + 1
    dist = (T - 1 - torch.arange(T)).float()
    s = torch.exp(-dist / 64.0).expand(*_AUTO_SHAPE, T).clone() + 1e-4
    spikes = torch.rand(*_AUTO_SHAPE, P // 2, generator=g).topk(16, dim=-1).indices + _AUTO_SINK
    return s.scatter_(-1, spikes, 1.0)


def _pillar_scores(P: int, k: int, g: torch.Generator, pillars: torch.Tensor) -> torch.Tensor:
    """Verify scores whose mass sits on a fixed set of old positions (`pillars` [2, 3, K]), with a
    weaker recent tail and noise."""
    T = P + k + 1
    dist = (T - 1 - torch.arange(T)).float()
    s = 0.2 * torch.exp(-dist / 24.0).expand(*_AUTO_SHAPE, T) + 1e-3 * torch.rand(*_AUTO_SHAPE, T, generator=g)
    return s.scatter_(-1, pillars, 1.0)


def _pillars(g: torch.Generator) -> torch.Tensor:
    return torch.rand(*_AUTO_SHAPE, 150, generator=g).topk(_AUTO_K, dim=-1).indices + _AUTO_SINK


def _auto_run(patterns: list[str], seed: int = 0) -> tuple[list[float], R.AutoSplit]:
    """Feed one AutoSplit a verify per pattern ("recent" / "pillar"); the F chosen at each."""
    g = torch.Generator().manual_seed(seed)
    split, pillars, P, chosen = R.AutoSplit(), _pillars(g), 300, []
    for pattern in patterns:
        s = _recent_scores(P, 8, g) if pattern == "recent" else _pillar_scores(P, 8, g, pillars)
        sel = R.DraftSelection("auto").select(s, _AUTO_SINK, P, _AUTO_K, split=split)
        assert sel.shape == (*_AUTO_SHAPE, _AUTO_K) and split.fraction is not None
        # The selection is hybrid:F's at the F just chosen.
        hybrid = R.DraftSelection("hybrid", recent_fraction=split.fraction)
        assert torch.equal(sel, hybrid.select(s, _AUTO_SINK, P, _AUTO_K))
        chosen.append(split.fraction)
        P += _AUTO_STEP
    return chosen, split


def test_auto_policy_parse_label_and_state():
    pol = R.DraftSelection.parse("auto")
    assert pol == R.DraftSelection("auto") and pol.label == "auto"
    for bad in ("auto:0.5", "automatic"):
        with pytest.raises(ValueError, match="selection policy"):
            R.DraftSelection.parse(bad)
    with pytest.raises(ValueError, match="AutoSplit"):
        pol.select(torch.ones(1, 1, 20), 2, 12, 4)
    for bad_split in (dict(fractions=(0.5, 0.25)), dict(fractions=(0.0, 1.5)), dict(weight=0.0), dict(first=2.0)):
        with pytest.raises(ValueError, match="auto"):
            R.AutoSplit(**bad_split)


def test_auto_split_moves_to_the_window_when_verifies_attend_recent_tokens():
    chosen, split = _auto_run(["recent"] * 6)
    assert chosen[0] == 0.5  # the first verify has no earlier scores to judge by
    assert all(f >= 0.75 for f in chosen[1:4]) and chosen[-1] >= 0.75
    # Captured mass grows with the recent share here, PillarAttn's (F 0) is the least.
    assert split.ema[0] == min(split.ema) and split.ema[-1] > split.ema[0] + 0.05


def test_auto_split_moves_to_pillar_when_verifies_attend_fixed_old_tokens():
    chosen, split = _auto_run(["pillar"] * 6)
    assert chosen[0] == 0.5 and chosen[1:] == [0.0] * 5
    assert split.ema[0] == max(split.ema) > 0.8 and split.ema[-1] < 0.5


def test_auto_split_averages_over_verifies():
    """A change of pattern: strong evidence moves the choice within a few verifies, weak evidence
    against a strong average takes several (the latest verify alone would flip at once)."""
    chosen, _ = _auto_run(["recent"] * 6 + ["pillar"] * 8)
    assert chosen[5] >= 0.75 and chosen[-1] == 0.0 and chosen[6:].index(0.0) <= 2
    back, _ = _auto_run(["pillar"] * 6 + ["recent"] * 8)
    assert back[5:9] == [0.0] * 4 and back[-1] >= 0.75


def test_auto_split_rule_arithmetic_and_ties():
    g = torch.Generator().manual_seed(3)
    s1, s2, s3 = (torch.rand(1, 2, 60 + 3 * i, generator=g) for i in range(3))
    split = R.AutoSplit()
    assert split.update(s1, 2, 50, 8) == 0.5 and split.ema is None
    f2 = split.update(s2, 2, 53, 8)
    want = [R.captured_mass(s2, R.DraftSelection("hybrid", recent_fraction=f).select(s1, 2, 50, 8), 2, 50)
            for f in R.AUTO_FRACTIONS]
    assert split.ema == pytest.approx(want)
    split.update(s3, 2, 56, 8)
    now = [R.captured_mass(s3, R.DraftSelection("hybrid", recent_fraction=f).select(s2, 2, 53, 8), 2, 53)
           for f in R.AUTO_FRACTIONS]
    assert split.ema == pytest.approx([0.7 * a + 0.3 * b for a, b in zip(want, now)])
    assert f2 == R.AUTO_FRACTIONS[max(range(5), key=lambda i: (want[i], -i))]
    # Uniform scores: every split captures the same share, so the smallest F wins the tie.
    flat = R.AutoSplit()
    for n in range(4):
        flat.update(torch.ones(1, 2, 60 + n), 2, 50 + n, 8)
    assert flat.fraction == 0.0 and len(set(flat.ema)) == 1
    assert R.captured_mass(torch.ones(1, 1, 20), torch.tensor([[[3, 4]]]), 2, 12) == pytest.approx(0.2)


def test_auto_policy_is_lossless_and_wired(model, prompts, plain):
    cfg = R.SparseSpecConfig(num_draft_steps=4, sparsity=0.1, min_selected=3, max_selected=6, num_sink_tokens=2)
    seen = set()
    for p, ref in zip(prompts, plain):
        out = R.sparsespec_generate(model, p, MAX_NEW, cfg, policy="auto", ignore_eos=True, trace=True,
                                    target_tokens=ref)
        assert out.tokens == ref
        assert R.sparsespec_generate(model, p, MAX_NEW, cfg, policy="auto", ignore_eos=True).tokens == ref
        assert out.cycles[0].recent_fraction is None  # the first cycle's window precedes any verify
        replay = R.AutoSplit()  # a fresh split per request reproduces every choice
        for prev, cur in zip(out.cycles, out.cycles[1:]):
            expect = R.DraftSelection("auto").select(prev.scores, 2, prev.position, cur.num_selected, split=replay)
            assert torch.equal(cur.selection, expect) and cur.recent_fraction == replay.fraction
            seen.add(cur.recent_fraction)
    assert seen and seen <= set(R.AUTO_FRACTIONS)
    pillar = R.sparsespec_generate(model, prompts[2], MAX_NEW, cfg, ignore_eos=True)
    assert all(c.recent_fraction is None for c in pillar.cycles)


# ----------------------------------------------------------------------------- following a trajectory


def _check_follow_cycles(out, traj, k):
    """Every cycle counts acceptance against `traj` and the cycles tile the output."""
    expect_offset = 0
    for c in out.cycles:
        assert c.output_offset == expect_offset and c.position == out.prompt_len + c.output_offset
        nxt = traj[c.output_offset + 1:]
        m = 0
        while m < min(k, len(nxt)) and c.drafts[m] == nxt[m]:
            m += 1
        assert c.accepted == m
        assert c.bonus == (nxt[m] if m < len(nxt) else None)
        expect_offset += m + 1


@pytest.mark.parametrize("k,score_norm", [(4, "exact"), (8, "draft")])
def test_following_the_own_greedy_output_reproduces_the_run(model, prompts, plain, k, score_norm):
    """follow_tokens = the model's own greedy output changes nothing: tokens, cycles, drafts,
    selections and scores equal the unforced run (with or without a drafting guess)."""
    kw = dict(k=k, sparsity=0.3, min_sel=2, num_sink=2, score_norm=score_norm, ignore_eos=True, trace=True)
    wrong = [(t + 1) % 256 + 3 for t in plain[0]]
    accepted, cycles = 0, 0
    for p, ref in zip(prompts, plain):
        own = R.sparsespec_generate(model, p, MAX_NEW, **kw)
        accepted, cycles = accepted + sum(own.accepted_counts), cycles + len(own.cycles)
        for guess in (None, wrong):
            fol = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=ref, target_tokens=guess, **kw)
            assert fol.tokens == own.tokens == ref and fol.finish_reason == own.finish_reason
            assert _cycle_trace(fol) == _cycle_trace(own)
            assert [c.committed for c in fol.cycles] == [c.committed for c in own.cycles]
            for a, b in zip(fol.cycles, own.cycles):
                assert torch.equal(a.selection, b.selection)
                torch.testing.assert_close(a.scores, b.scores, rtol=1e-5, atol=1e-6)
    assert 0 < accepted < k * cycles  # misses and hits both exercised


def test_following_stops_at_the_trajectory_end(model, prompts, plain):
    p, ref = prompts[1], plain[1]
    kw = dict(k=4, sparsity=1.0, min_sel=0, max_sel=10**6, ignore_eos=True)
    for n in (1, 2, 7, 20):
        out = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=ref[:n], **kw)
        assert out.tokens == ref[:n] and out.finish_reason == "length"
        _check_follow_cycles(out, ref[:n], 4)
        # Dense drafts match the whole remaining trajectory: the last cycle counts only what it covers.
        if out.cycles:
            assert out.cycles[-1].accepted == min(4, n - 1 - out.cycles[-1].output_offset)
    assert R.sparsespec_generate(model, p, 5, follow_tokens=ref, **kw).tokens == ref[:5]  # budget first
    # A trajectory whose first token is not the prefill's argmax: that token is committed and the
    # (dense) drafts continue from it.
    first = [(ref[0] + 5) % 256 + 3] + ref[1:6]
    out = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=first, **kw)
    assert out.tokens == first and out.cycles[0].accepted < 4
    assert out.cycles[0].drafts == R.plain_generate(model, p + first[:1], 4, ignore_eos=True).tokens
    assert R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=[], **kw).tokens == []
    eos = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=ref, k=4, eos_token_id=ref[9])
    assert eos.tokens == ref[: ref.index(ref[9]) + 1] and eos.finish_reason == "stop"
    with pytest.raises(ValueError, match="follow_tokens needs greedy"):
        R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=ref, temperature=0.7)


@pytest.mark.parametrize("sparse", [False, True])
def test_following_a_changed_trajectory(model, prompts, plain, sparse):
    """The greedy output with one token changed mid-way: exactly its tokens are committed, every
    cycle counts acceptance against it, and the KV follows it (dense drafts = the model's greedy
    continuation of the trajectory's text so far, so the cache holds that text)."""
    k = 4
    kw = (dict(k=k, sparsity=0.3, min_sel=2, num_sink=2) if sparse
          else dict(k=k, sparsity=1.0, min_sel=0, max_sel=10**6))
    for p, ref in zip(prompts[1:], plain[1:]):
        i = 13
        traj = ref[:i] + [(ref[i] + 7) % 256 + 3] + ref[i + 1:]
        assert traj[i] != ref[i]
        out = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=traj, ignore_eos=True, trace=True, **kw)
        assert out.tokens == traj
        _check_follow_cycles(out, traj, k)
        # The changed token is never drafted (the model's argmax there is ref[i]): it is a bonus.
        assert any(c.output_offset + 1 + c.accepted == i and c.bonus == traj[i] for c in out.cycles)
        # Before the change, the run is the unforced one.
        own = R.sparsespec_generate(model, p, MAX_NEW, ignore_eos=True, trace=True, **kw)
        before = [c for c in own.cycles if c.output_offset + 1 + c.accepted < i]
        assert _cycle_trace(out)[: len(before)] == _cycle_trace(SimpleNamespace(cycles=before))
        fast = R.sparsespec_generate(model, p, MAX_NEW, follow_tokens=traj, target_tokens=ref, ignore_eos=True,
                                     trace=True, **kw)
        assert _cycle_trace(fast) == _cycle_trace(out)
        if not sparse:
            for c in out.cycles:
                ctx = p + traj[: c.output_offset + 1]
                assert c.drafts == R.plain_generate(model, ctx, k, ignore_eos=True).tokens
            after = [c for c in out.cycles if c.output_offset >= i]
            assert after and sum(c.accepted for c in after) < k * len(after)  # the text after no longer fits


def test_followed_trajectory_is_the_drafting_guess(model, prompts, plain, monkeypatch):
    """Without target_tokens the followed tokens guide `_greedy_drafts` (same drafts, fewer forwards)."""
    calls = []
    real = R._forward
    monkeypatch.setattr(R, "_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    kw = dict(k=8, sparsity=0.7, min_sel=2, num_sink=2, ignore_eos=True)
    out = R.sparsespec_generate(model, prompts[2], MAX_NEW, follow_tokens=plain[2], **kw)
    assert sum(out.accepted_counts) > 0
    bound = 1 + sum(1 + (8 - min(c.accepted + 1, 8)) + 1 for c in out.cycles)
    assert len(calls) <= bound < 1 + 9 * len(out.cycles)
