"""Verify-time sampling keeps plain SGLang's top-k / top-p / min-p semantics (CPU)."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang import sampling
from sparsespec_sglang.sampling import filter_probs, needs_plain_filtering


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

    monkeypatch.setattr(sampling, "eagle_sample", fake_eagle_sample)
    out = SimpleNamespace(next_token_logits=logits.clone())
    result = sampling.sample_like_plain(SimpleNamespace(draft_token_num=n), SimpleNamespace(sampling_info=info),
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
        got = sampling._filter_probs_kernels(probs, top_ks, top_ps, mp, top_k_first)
        assert ((got > 0) != (want > 0)).sum().item() <= 2  # a boundary token may tie
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)


def test_penalised_batches_are_flagged_once(monkeypatch, caplog):
    monkeypatch.setattr(sampling, "eagle_sample", lambda *args: "result")
    sampling._warn_penalties.cache_clear()
    info = _info(need_top_k_sampling=False, acc_additive_penalties=torch.zeros(1, 4))
    batch = SimpleNamespace(sampling_info=info)
    with caplog.at_level("WARNING", logger="sparsespec_sglang.sampling"):
        for _ in range(3):
            sampling.sample_like_plain(SimpleNamespace(draft_token_num=2), batch,
                                       SimpleNamespace(next_token_logits=torch.zeros(2, 4)), None, "flashinfer")
    assert sum("penalties" in r.message for r in caplog.records) == 1
