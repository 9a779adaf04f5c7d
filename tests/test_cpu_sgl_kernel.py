"""The CPU stand-ins of sgl_kernel's ops (tests/sgl_kernel_cpu) against their twins in SGLang.

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
from types import SimpleNamespace  # noqa: E402
from sparsespec_sglang.acceptance import chain_tree  # noqa: E402


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


def _ragged(seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.tensor([3, 0, 5, 2], dtype=torch.int64)
    start = torch.tensor([0, 7, 2, 30], dtype=torch.int64)
    end = start + torch.tensor([5, 1, 0, 33], dtype=torch.int64)  # a zero-length request too
    req_to_token = torch.randint(0, 1000, (6, 64), generator=gen, dtype=torch.int32)
    locs = torch.randint(0, 1000, (int((end - start).sum()),), generator=gen, dtype=torch.int64)
    return rows, start, end, req_to_token, locs


def test_assign_req_to_token_pool_equals_sglangs_triton_kernel():
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool

    rows, start, end, table, locs = _ragged(0)
    want = table.clone()
    assign_req_to_token_pool[(4,)](rows, want, start, end, locs, want.shape[1], 8)
    got = table.clone()
    standin.standin.assign_req_to_token_pool_cpu(rows, got, start, end, locs, got.shape[1])
    assert torch.equal(got, want) and not torch.equal(got, table)


def test_assign_extend_cache_locs_equals_sglangs_triton_kernel():
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs

    rows, start, end, table, locs = _ragged(1)
    want = torch.zeros_like(locs)
    assign_extend_cache_locs[(4,)](rows, table, start, end, want, table.shape[1], 8)
    got = torch.zeros_like(locs)
    standin.standin.assign_extend_cache_locs_cpu(rows, table, start, end, got, table.shape[1])
    assert torch.equal(got, want) and bool(got.any())


def test_copy_all_layer_kv_cache_moves_every_layers_slots():
    bufs = [torch.randn(10, 2, 4), torch.randn(10, 3), torch.randn(10, 2, 4).to(torch.bfloat16)]
    want = [b.clone() for b in bufs]
    tgt, src = torch.tensor([1, 7, 4]), torch.tensor([6, 2, 4])
    for w in want:
        w[tgt] = w[src].clone()
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in bufs], dtype=torch.int64)
    standin.standin.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for b, w in zip(bufs, want):
        assert torch.equal(b, w)


def test_greedy_verify_follows_the_targets_argmax_on_chains_and_trees():
    from toy_model import greedy_chain_accept

    probs, cand, _, _ = _chain_inputs(32, 5, 30, 4)
    target = probs.argmax(-1)
    index, nxt, sibling = chain_tree(32, 5, torch.device("cpu"))
    predicts = torch.zeros(32 * 5, dtype=torch.int32)
    accept_index = torch.full((32, 5), -1, dtype=torch.int32)
    num = torch.zeros(32, dtype=torch.int32)
    standin.standin.verify_tree_greedy_cpu(predicts, accept_index, num, cand, index, nxt, sibling, target)
    verify_input = SimpleNamespace(draft_token=cand.flatten(), draft_token_num=5, retrieve_next_token=nxt)
    want_predict, want_lens, want_index = greedy_chain_accept(verify_input, None, SimpleNamespace(
        next_token_logits=probs.view(32 * 5, -1)))
    assert torch.equal(num + 1, want_lens) and torch.equal(accept_index, want_index)
    assert torch.equal(predicts[accept_index[accept_index >= 0].long()], want_predict[want_index[want_index >= 0].long()])
    assert 0 < int(num.sum()) < 32 * 4
    # A tree: root 0 has children 1 and 2 (siblings); 2 matches the target, then its child 3.
    cand = torch.tensor([[5, 8, 9, 4]])
    nxt, sib = torch.tensor([[1, -1, 3, -1]]), torch.tensor([[-1, 2, -1, -1]])
    predicts, accept_index, num = torch.zeros(4, dtype=torch.int32), torch.full((1, 3), -1, dtype=torch.int32), \
        torch.zeros(1, dtype=torch.int32)
    standin.standin.verify_tree_greedy_cpu(predicts, accept_index, num, cand, torch.arange(4).view(1, 4), nxt, sib,
                                           torch.tensor([[9, 0, 4, 6]]))
    assert num.tolist() == [2] and accept_index.tolist() == [[0, 2, 3]] and predicts[[0, 2, 3]].tolist() == [9, 4, 6]


def test_a_name_the_stand_in_lacks_is_an_import_error_and_an_unused_one_says_so(monkeypatch):
    standin.install(monkeypatch)
    with pytest.raises(ImportError):
        from sgl_kernel import fused_add_rmsnorm  # noqa: F401  (SGLang's own fallback then runs)
    from sgl_kernel import fill_bonus_tokens_cpu
    with pytest.raises(NotImplementedError, match="not implemented here"):
        fill_bonus_tokens_cpu()
