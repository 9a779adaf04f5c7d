"""The CPU stand-ins of sgl_kernel's sampling ops (cpu_sgl_kernel.py) against their twins in SGLang.

``chain_speculative_sampling_triton`` is SGLang's Triton chain sampler (run here in the Triton
interpreter). Given each draft as a point mass (one-hot draft probabilities) it accepts a draft
when its coin is below the target probability and samples the residual otherwise: with the same
coins it must pick exactly the stand-in's tokens. The renorm stand-ins are checked against plain
SGLang's PyTorch sampler's filtering.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cpu_sgl_kernel as standin  # noqa: E402
from sparsespec_sglang.sampling import chain_tree  # noqa: E402


def _chain_inputs(bs: int, width: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(bs, width, vocab, generator=gen) * 2.0, dim=-1)
    # Drafts: the argmax at some depths (often accepted), a random token at others.
    cand = torch.randint(0, vocab, (bs, width), generator=gen)
    top = probs.argmax(-1)
    use_top = torch.rand(bs, width, generator=gen) < 0.7
    cand[:, 1:] = torch.where(use_top[:, 1:], top[:, :-1], cand[:, 1:])
    coins = torch.rand(bs, width, generator=gen)
    final = torch.rand(bs, generator=gen)
    return probs, cand.to(torch.int64), coins, final


def _run(fn, probs, cand, coins, final, draft_probs):
    bs, width, _ = probs.shape
    index, nxt, sibling = chain_tree(bs, width, torch.device("cpu"))
    predicts = torch.zeros(bs * width, dtype=torch.int32)
    accept_index = torch.full((bs, width), -1, dtype=torch.int32)
    accept_num = torch.zeros(bs, dtype=torch.int32)
    fn(predicts=predicts, accept_index=accept_index, accept_token_num=accept_num, candidates=cand,
       retrive_index=index, retrive_next_token=nxt, retrive_next_sibling=sibling, uniform_samples=coins,
       uniform_samples_for_final_sampling=final, target_probs=probs, draft_probs=draft_probs,
       threshold_single=1.0, threshold_acc=1.0, deterministic=True)
    return predicts, accept_index, accept_num


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chain_sampling_equals_sglangs_triton_chain_sampler(seed):
    from sglang.kernels.ops.speculative.reject_sampling import chain_speculative_sampling_triton

    probs, cand, coins, final = _chain_inputs(64, 5, 50, seed)
    point_mass = torch.nn.functional.one_hot(cand[:, 1:], probs.shape[-1]).float()
    point_mass = torch.cat([point_mass, torch.zeros_like(point_mass[:, :1])], dim=1)
    want = _run(chain_speculative_sampling_triton, probs, cand, coins, final, point_mass)
    got = _run(standin.tree_speculative_sampling_target_only, probs, cand, coins, final, torch.zeros_like(probs))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assert 0 < int(got[2].sum()) < 64 * 4  # partly accepted


def test_renorm_keeps_what_plain_sampling_keeps():
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    gen = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(8, 40, generator=gen) * 2.0, dim=-1)
    top_ks = torch.tensor([1, 2, 5, 40, 40, 40, 3, 7])
    top_ps = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.9, 0.2, 1.0, 1.0])
    kept_k = standin.top_k_renorm_prob(probs, top_ks) > 0
    kept_p = standin.top_p_renorm_prob(probs, top_ps) > 0
    torch.testing.assert_close(standin.top_k_renorm_prob(probs, top_ks).sum(-1), torch.ones(8))
    for _ in range(200):  # plain's sampler only ever draws kept tokens, and draws every kept one
        k_only = top_k_top_p_min_p_sampling_from_probs_torch(probs, top_ks, torch.ones(8), torch.zeros(8), False,
                                                             None, None).view(-1)
        p_only = top_k_top_p_min_p_sampling_from_probs_torch(probs, torch.full((8,), 40), top_ps, torch.zeros(8),
                                                             False, None, None).view(-1)
        assert bool(kept_k[torch.arange(8), k_only].all()) and bool(kept_p[torch.arange(8), p_only].all())
    assert kept_k.sum(-1).tolist() == top_ks.tolist()


def test_sibling_drafts_are_refused():
    probs, cand, coins, final = _chain_inputs(2, 3, 10, 0)
    index, nxt, sibling = chain_tree(2, 3, torch.device("cpu"))
    sibling = sibling.clone()
    sibling[0, 1] = 2
    with pytest.raises(NotImplementedError, match="chains only"):
        standin.tree_speculative_sampling_target_only(
            torch.zeros(6, dtype=torch.int32), torch.full((2, 3), -1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
            cand, index, nxt, sibling, coins, final, probs, torch.zeros_like(probs))
