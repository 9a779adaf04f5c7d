"""Acceptance (sparsespec_sglang/acceptance.py) on the CPU: the one call both schedules use
(chains in, what PillarState.commit and SGLang's result need out), and verify-time sampling with
plain SGLang's top-k / top-p / min-p semantics."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang import acceptance
from sparsespec_sglang.acceptance import accept, filter_probs, needs_plain_filtering, verify_chains


def _brute_force(p: torch.Tensor, k: int, top_p: float, min_p: float, top_k_first: bool) -> torch.Tensor:
    order = sorted(range(len(p)), key=lambda i: -float(p[i]))
    topk = set(order[:k])
    base = p.clone()
    if top_k_first:
        base = torch.tensor([float(p[i]) if i in topk else 0.0 for i in range(len(p))])
        base = base / base.sum()
    nucleus, above = set(), 0.0
    for i in order:
        if above <= top_p:
            nucleus.add(i)
        above += float(base[i])
    keep = topk & nucleus
    peak = max(float(p[i]) for i in keep)
    keep = {i for i in keep if float(p[i]) >= peak * min_p}
    out = torch.tensor([float(p[i]) if i in keep else 0.0 for i in range(len(p))], dtype=p.dtype)
    return out / out.sum()


@pytest.mark.parametrize("top_k_first", [False, True])
def test_filter_probs_matches_brute_force(top_k_first):
    gen = torch.Generator().manual_seed(0)
    rows, vocab = 24, 40
    probs = torch.softmax(torch.randn(rows, vocab, generator=gen) * 2, dim=-1, dtype=torch.float64)
    top_ks = torch.randint(1, vocab + 5, (rows,), generator=gen)
    top_ps = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.9 + 0.05
    min_ps = torch.rand(rows, generator=gen, dtype=torch.float64) * 0.3
    got = filter_probs(probs, top_ks, top_ps, min_ps, top_k_first)
    for r in range(rows):
        want = _brute_force(probs[r], int(top_ks[r]), float(top_ps[r]), float(min_ps[r]), top_k_first)
        torch.testing.assert_close(got[r], want)


def test_joint_and_top_k_first_differ_where_plain_and_eagle_would():
    # 0.5 / 0.3 / 0.2: top-k 2 keeps {0, 1}; joint top-p 0.6 on the original keeps {0, 1}
    # (mass above token 1 is 0.5); top-k-first renormalises to 0.625 / 0.375 and keeps {0}.
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    k, p = torch.tensor([2]), torch.tensor([0.6])
    assert filter_probs(probs, k, p, None, top_k_first=False).tolist() == [[0.625, 0.375, 0.0]]
    assert filter_probs(probs, k, p, None, top_k_first=True).tolist() == [[1.0, 0.0, 0.0]]


def _info(**kw):
    base = dict(is_all_greedy=False, need_top_k_sampling=True, need_top_p_sampling=True,
                need_min_p_sampling=False, acc_additive_penalties=None, acc_scaling_penalties=None,
                logit_bias=None)
    base.update(kw)
    return SimpleNamespace(**base)


def test_only_batches_where_eagle_differs_are_refiltered():
    assert needs_plain_filtering(_info())
    assert needs_plain_filtering(_info(need_top_k_sampling=False, need_top_p_sampling=False,
                                       need_min_p_sampling=True))
    assert not needs_plain_filtering(_info(need_top_p_sampling=False))
    assert not needs_plain_filtering(_info(need_top_k_sampling=False))
    assert not needs_plain_filtering(_info(is_all_greedy=True))


def test_sample_like_plain_hands_eagle_sample_the_plain_distribution(monkeypatch):
    bs, n, vocab = 2, 3, 16
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(bs * n, vocab, generator=gen)
    bias = torch.zeros(bs, vocab)
    bias[:, 5] = 3.0
    info = _info(need_min_p_sampling=True, logit_bias=bias,
                 temperatures=torch.tensor([[0.7], [1.3]]), top_ks=torch.tensor([8, 4]),
                 top_ps=torch.tensor([0.8, 0.95]), min_ps=torch.tensor([0.05, 0.0]))
    seen = {}

    def fake_eagle_sample(verify_input, batch, logits_output, grammar_mask):
        seen["logits"] = logits_output.next_token_logits.clone()
        seen["flags"] = (info.need_top_k_sampling, info.need_top_p_sampling,
                         info.need_min_p_sampling, info.logit_bias)
        seen["grammar_mask"] = grammar_mask
        return "result"

    monkeypatch.setattr(acceptance, "eagle_sample", fake_eagle_sample)
    out = SimpleNamespace(next_token_logits=logits.clone())
    result = acceptance.sample_like_plain(SimpleNamespace(draft_token_num=n), SimpleNamespace(sampling_info=info),
                                          out, None, sampling_backend="flashinfer")
    assert result == "result"
    assert seen["flags"] == (False, False, False, None) and seen["grammar_mask"] is None
    temps = info.temperatures.repeat_interleave(n, dim=0)
    want = filter_probs(torch.softmax((logits + bias.repeat_interleave(n, dim=0)) / temps, dim=-1),
                        info.top_ks.repeat_interleave(n), info.top_ps.repeat_interleave(n),
                        info.min_ps.repeat_interleave(n), top_k_first=True)
    torch.testing.assert_close(torch.softmax(seen["logits"] / temps, dim=-1), want)
    # The batch and the logits object are given back as they were (bias applied in place, as
    # eagle_sample itself does).
    assert (info.need_top_k_sampling, info.need_top_p_sampling, info.need_min_p_sampling) == (True, True, True)
    assert info.logit_bias is bias
    torch.testing.assert_close(out.next_token_logits, logits + bias.repeat_interleave(n, dim=0))


def test_sglang_fields_the_sampler_reads():
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo

    from sparsespec_sglang.compat import apply_scaling_penalties

    fields = {f.name for f in dataclasses.fields(SamplingBatchInfo)}
    assert {"temperatures", "top_ks", "top_ps", "min_ps", "is_all_greedy", "need_top_p_sampling",
            "need_top_k_sampling", "need_min_p_sampling", "acc_additive_penalties",
            "acc_scaling_penalties", "logit_bias"} <= fields
    assert list(inspect.signature(apply_scaling_penalties).parameters) == ["logits", "scaling_penalties"]


def test_plain_sampling_filters_as_filter_probs_reproduces():
    """Plain SGLang's sampler, per ``get_exec().kernel.sampling_backend`` (what the worker hands
    ``sample_like_plain``): FlashInfer (and, from 0.5.21, Intel XPU) filters top-k and top-p
    jointly, or top-k, then top-p, then min-p when min-p is on; PyTorch filters top-k and top-p
    jointly on the sorted original probabilities, then min-p against the largest."""
    from sglang.srt.layers import sampler

    from sparsespec_sglang import compat

    source = inspect.getsource(sampler.Sampler._sample_from_probs)
    branch = ('if backend in ("flashinfer", "intel_xpu"):' if compat.since("0.5.21")
              else 'if backend == "flashinfer":')
    assert "backend = get_exec().kernel.sampling_backend" in source and branch in source
    flashinfer = source[source.index(branch):source.index('elif backend == "pytorch":')]
    min_p = flashinfer.index("if sampling_info.need_min_p_sampling:")
    assert (min_p < flashinfer.index("top_k_renorm_prob(probs, sampling_info.top_ks)")
            < flashinfer.index("top_p_renorm_prob(probs, sampling_info.top_ps)")
            < flashinfer.index("min_p_sampling_from_probs(") < flashinfer.index("else:")
            < flashinfer.index('filter_apply_order="joint"'))
    assert "top_k_top_p_min_p_sampling_from_probs_torch(" in source[source.index('elif backend == "pytorch":'):]
    torch_filter = inspect.getsource(sampler.top_k_top_p_min_p_sampling_from_probs_torch)
    steps = ["probs_sum = torch.cumsum(probs_sort, dim=-1)", ">= top_ks.view(-1, 1)",
             "probs_sort[(probs_sum - probs_sort) > top_ps.view(-1, 1)] = 0.0",
             "min_p_thresholds = probs_sort[:, 0] * min_ps"]
    assert [torch_filter.index(step) for step in steps] == sorted(torch_filter.index(step) for step in steps)


def test_eagle_sample_filters_as_sample_like_plain_expects():
    """``sample_like_plain`` folds the target distribution into the logits and switches off what
    ``eagle_sample`` would apply again: penalties, logit bias and the grammar mask first, then
    softmax(logits / T) with top-k and top-p renormalisation; eagle_sample never applies min-p."""
    from sparsespec_sglang.compat import eagle_sample

    source = inspect.getsource(eagle_sample)
    steps = ["if sampling_info.acc_additive_penalties is not None:",
             "if sampling_info.acc_scaling_penalties is not None:",
             "if sampling_info.logit_bias is not None:", "grammar_mask.apply(next_token_logits)",
             "expanded_temperature = torch.repeat_interleave(", "if sampling_info.need_top_k_sampling:",
             "if sampling_info.need_top_p_sampling:"]
    assert [source.index(step) for step in steps] == sorted(source.index(step) for step in steps)
    assert "need_min_p_sampling" not in source


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (sgl_kernel)")
@pytest.mark.parametrize("top_k_first", [False, True])
def test_kernel_filter_matches_the_reference(top_k_first):
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 64, 4096
    probs = torch.softmax(torch.randn(rows, vocab, device="cuda", generator=gen) * 3, dim=-1)
    top_ks = torch.randint(1, 200, (rows,), device="cuda", generator=gen, dtype=torch.int32)
    top_ps = torch.rand(rows, device="cuda", generator=gen) * 0.9 + 0.05
    min_ps = torch.rand(rows, device="cuda", generator=gen) * 0.2
    for mp in (None, min_ps):
        want = filter_probs(probs, top_ks, top_ps, mp, top_k_first)
        got = acceptance._filter_probs_kernels(probs, top_ks, top_ps, mp, top_k_first)
        assert ((got > 0) != (want > 0)).sum().item() <= 2  # a boundary token may tie
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_penalised_batches_are_flagged_once(monkeypatch, caplog):
    monkeypatch.setattr(acceptance, "eagle_sample", lambda *args: "result")
    acceptance._warn_penalties.cache_clear()
    info = _info(need_top_k_sampling=False, acc_additive_penalties=torch.zeros(1, 4))
    batch = SimpleNamespace(sampling_info=info)
    with caplog.at_level("WARNING", logger="sparsespec_sglang.acceptance"):
        for _ in range(3):
            acceptance.sample_like_plain(SimpleNamespace(draft_token_num=2), batch,
                                         SimpleNamespace(next_token_logits=torch.zeros(2, 4)), None, "flashinfer")
    assert sum("penalties" in r.message for r in caplog.records) == 1


# ----------------------------------------------------------------------------- accept()


def _chains(prefix: list[int], width: int, chain_lens: list[int] | None = None):
    """verify_chains of len(prefix) chains whose tokens are 10 * v + j (node j of chain v)."""
    n = len(prefix)
    tokens = torch.tensor([10 * v + j for v in range(n) for j in range(width)])
    prefix_t = torch.tensor(prefix)
    positions = (prefix_t.unsqueeze(1) + torch.arange(width)).flatten()
    nxt = None
    if chain_lens is not None:
        nxt = torch.tensor([j + 1 if j + 1 < m else -1 for m in chain_lens for j in range(width)]).view(n, width)
    return verify_chains(tokens, positions, prefix_t, width, next_token=nxt)


def _fake_eagle(lens: list[int], seen: dict):
    """An eagle_sample stand-in that accepts ``lens[v]`` tokens of chain v, token 100 v + j."""

    def sample(verify_input, batch, logits_output, grammar_mask):
        seen.update(batch=batch, grammar_mask=grammar_mask, verify_input=verify_input)
        w = verify_input.draft_token_num
        n = len(lens)
        predict = torch.tensor([100 * v + j for v in range(n) for j in range(w)], dtype=torch.int32)
        index = torch.full((n, w), -1, dtype=torch.int32)
        for v, m in enumerate(lens):
            index[v, :m] = torch.arange(v * w, v * w + m, dtype=torch.int32)
        return predict, torch.tensor(lens, dtype=torch.int32), index

    return sample


def test_verify_chains_is_the_chain_tree_of_full_or_short_chains():
    full = _chains([5, 9], 3)
    assert full.draft_token_num == 3 and torch.equal(full.new_seq_lens, torch.tensor([5, 9]))
    assert full.custom_mask is None and full.device == torch.device("cpu")
    assert full.retrieve_index.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert full.retrieve_next_token.tolist() == [[1, 2, -1], [1, 2, -1]]
    assert full.retrieve_next_sibling.tolist() == [[-1] * 3] * 2
    assert full.positions.tolist() == [5, 6, 7, 9, 10, 11]
    short = _chains([5, 9], 3, chain_lens=[1, 3])
    assert short.retrieve_next_token.tolist() == [[-1, -1, -1], [1, 2, -1]]


def test_accept_returns_what_commit_and_the_step_result_need(monkeypatch):
    seen = {}
    monkeypatch.setattr(acceptance, "eagle_sample", _fake_eagle([2, 3, 1], seen))
    info = _info(is_all_greedy=True, need_top_k_sampling=False, need_top_p_sampling=False)
    batch = SimpleNamespace(sampling_info=info, reqs=[None] * 3)
    out = accept(_chains([4, 7, 9], 3), batch, SimpleNamespace(next_token_logits=torch.zeros(9, 8)), "flashinfer")
    assert seen["batch"] is batch and seen["grammar_mask"] is None  # the whole batch: handed over as is
    assert out.tokens.dtype == torch.int32 and out.tokens.shape == (3, 3)
    assert [out.tokens[v, :m].tolist() for v, m in enumerate([2, 3, 1])] == [[0, 1], [100, 101, 102], [200]]
    assert out.lens.tolist() == [2, 3, 1]
    assert out.last_tokens.tolist() == [1, 102, 200]
    assert out.new_seq_lens.tolist() == [6, 10, 10]
    assert out.accept_index.shape == (3, 3) and out.predict.shape == (9,)


def test_accept_clamps_a_short_chain_to_its_length(monkeypatch):
    # SGLang's forced acceptance lengths (benchmarks) may run past a chain's real end.
    monkeypatch.setattr(acceptance, "eagle_sample", _fake_eagle([3, 3], {}))
    info = _info(is_all_greedy=True)
    batch = SimpleNamespace(sampling_info=info, reqs=[None] * 2)
    out = accept(_chains([4, 7], 3, chain_lens=[1, 3]), batch, SimpleNamespace(next_token_logits=torch.zeros(6, 8)),
                 "flashinfer", requests=torch.tensor([0, 1]), chain_lens=torch.tensor([1, 3], dtype=torch.int32))
    assert out.lens.tolist() == [1, 3] and out.last_tokens.tolist() == [0, 102]
    assert out.new_seq_lens.tolist() == [5, 10]


def test_accept_of_a_subset_samples_with_those_requests_parameters(monkeypatch):
    seen = {}
    monkeypatch.setattr(acceptance, "eagle_sample", _fake_eagle([1, 2], seen))
    info = _info(need_top_k_sampling=True, need_top_p_sampling=False,
                 temperatures=torch.tensor([[0.5], [0.75], [0.25]]), top_ks=torch.tensor([3, 4, 5]),
                 scalar=torch.tensor(1.0))
    batch = SimpleNamespace(sampling_info=info, reqs=[None] * 3)
    accept(_chains([4, 7], 2), batch, SimpleNamespace(next_token_logits=torch.zeros(4, 8)), "pytorch",
           requests=torch.tensor([2, 0]))
    view = seen["batch"]
    assert view is not batch and torch.equal(view.seq_lens, torch.tensor([4, 7]))
    assert view.device == torch.device("cpu") and view.forward_mode.is_target_verify()
    assert view.sampling_info.temperatures.view(-1).tolist() == [0.25, 0.5]
    assert view.sampling_info.top_ks.tolist() == [5, 3]
    assert view.sampling_info.scalar is info.scalar  # not per request: not indexed
    assert info.top_ks.tolist() == [3, 4, 5]  # the batch's own info is left alone
    greedy = _info(is_all_greedy=True, top_ks=torch.tensor([3, 4, 5]))
    accept(_chains([4, 7], 2), SimpleNamespace(sampling_info=greedy, reqs=[None] * 3),
           SimpleNamespace(next_token_logits=torch.zeros(4, 8)), "pytorch", requests=torch.tensor([2, 0]))
    assert seen["batch"].sampling_info is greedy  # argmax acceptance reads no per-request tensor


def test_accept_masks_the_target_with_the_chains_grammar(monkeypatch):
    seen, built = {}, {}
    monkeypatch.setattr(acceptance, "eagle_sample", _fake_eagle([1], seen))

    def build(**kw):
        built.update(kw)
        return "mask"

    monkeypatch.setattr(acceptance, "build_grammar_vocab_mask", build)
    info = _info(is_all_greedy=True)
    batch = SimpleNamespace(sampling_info=info, reqs=["req"])
    accept(_chains([4], 2), batch, SimpleNamespace(next_token_logits=torch.zeros(2, 8)), "flashinfer",
           grammar_tree="tree")
    assert seen["grammar_mask"] == "mask"
    assert built == dict(reqs=["req"], tree="tree", sampling_info=info, device=torch.device("cpu"), barrier=None)
