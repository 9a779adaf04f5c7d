"""A stand-in ``sgl_kernel`` for running SGLang's CPU engine in tests (never shipped to users).

SGLang imports sgl_kernel's ``*_cpu`` ops at module level when it runs on a CPU, and PyPI's
sglang-kernel is a CUDA build. This package, put first on ``PYTHONPATH`` of a test's engine
processes, gives those names PyTorch bodies, each checked against its Triton twin in SGLang
(tests/test_cpu_sgl_kernel.py). Names SGLang imports but the plugin's path never calls raise
``NotImplementedError`` when called; any other name is missing, so ``from sgl_kernel import X``
raises ImportError and SGLang takes the fallback it takes without sgl_kernel.

The sampling ops (``top_k_renorm_prob``, ``top_p_renorm_prob``,
``tree_speculative_sampling_target_only``) follow sgl_kernel on a chain: at depth j the draft
``c[j+1]`` is accepted when ``coin[j] <= q_j(c[j+1]) / threshold_acc`` or ``q_j(c[j+1]) >=
threshold_single``; at the first rejection the next token is drawn with the final coin from q_j
with the rejected draft's mass removed (the residual of a point-mass draft), and after a fully
accepted chain from the last row's q. The renorm ops keep the top-k tokens (ties: all at the
k-th value), or the smallest prefix in descending order whose mass reaches top-p.
"""

from __future__ import annotations

import ctypes

import torch


def top_k_renorm_prob(probs: torch.Tensor, top_ks: torch.Tensor) -> torch.Tensor:
    k = top_ks.view(-1).long().clamp(min=1, max=probs.shape[-1])
    kth = probs.sort(dim=-1, descending=True).values.gather(-1, (k - 1).view(-1, 1))
    kept = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_renorm_prob(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) <= top_ps.view(-1, 1)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def tree_speculative_sampling_target_only(
    predicts: torch.Tensor, accept_index: torch.Tensor, accept_token_num: torch.Tensor,
    candidates: torch.Tensor, retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
    retrive_next_sibling: torch.Tensor, uniform_samples: torch.Tensor,
    uniform_samples_for_final_sampling: torch.Tensor, target_probs: torch.Tensor,
    draft_probs: torch.Tensor, threshold_single: float = 1.0, threshold_acc: float = 1.0,
    deterministic: bool = True,
) -> None:
    if bool((retrive_next_sibling != -1).any()):
        raise NotImplementedError("the CPU stand-in samples chains only (no sibling drafts)")
    for b in range(candidates.shape[0]):
        node, row, num = 0, 0, 0
        accept_index[b, 0] = retrive_index[b, 0]
        residual = None
        while True:
            child = int(retrive_next_token[b, node])
            if child < 0:
                break
            token = int(candidates[b, child])
            q = float(target_probs[b, row, token])
            # the coin of a depth sits at its parent's index, as in sgl_kernel and the Triton twin
            if float(uniform_samples[b, node]) <= q / threshold_acc or q >= threshold_single:
                predicts[retrive_index[b, node]] = token
                num += 1
                accept_index[b, num] = retrive_index[b, child]
                node, row = child, child
            else:
                residual = target_probs[b, row].clone()
                residual[token] = 0.0
                break
        dist = target_probs[b, row] if residual is None else residual
        cdf = torch.cumsum(dist, dim=0)
        u = float(uniform_samples_for_final_sampling[b]) * float(cdf[-1])
        final = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True)[0])
        predicts[retrive_index[b, node]] = min(final, dist.numel() - 1)
        accept_token_num[b] = num


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index,
                           retrive_next_token, retrive_next_sibling, target_predict) -> None:
    """Greedy tree (or chain) verification: follow the child that equals the target's argmax."""
    for b in range(candidates.shape[0]):
        node, num = 0, 0
        accept_index[b, 0] = retrive_index[b, 0]
        while True:
            child, target = int(retrive_next_token[b, node]), int(target_predict[b, node])
            while child >= 0 and int(candidates[b, child]) != target:
                child = int(retrive_next_sibling[b, child])
            if child < 0:
                break
            predicts[retrive_index[b, node]] = target
            num += 1
            accept_index[b, num] = retrive_index[b, child]
            node = child
        predicts[retrive_index[b, node]] = int(target_predict[b, node])
        accept_token_num[b] = num


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """req_to_token[row, start:end] = the row's slice of out_cache_loc (rows back to back)."""
    off = 0
    for row, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[row, s:e] = out_cache_loc[off:off + e - s].to(req_to_token.dtype)
        off += e - s


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """The reverse: out_cache_loc gets each row's req_to_token[row, start:end], back to back."""
    off = 0
    for row, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        out_cache_loc[off:off + e - s] = req_to_token[row, s:e].to(out_cache_loc.dtype)
        off += e - s


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """For every buffer (its address and its bytes per slot), copy slot src_loc[i] to tgt_loc[i]."""
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        for tgt, src in zip(tgt_loc.tolist(), src_loc.tolist()):
            if tgt != src:
                ctypes.memmove(ptr + tgt * stride, ptr + src * stride, stride)


def _not_implemented(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(f"stand-in sgl_kernel: {name} is imported by SGLang on a CPU but not "
                                  "implemented here (SPARSESPEC's path does not call it)")
    op.__name__ = name
    return op


# Imported at module level by SGLang on a CPU, never called on SPARSESPEC's path (EAGLE, trees).
for _name in ("fill_accept_out_cache_loc_cpu", "fill_bonus_tokens_cpu", "rotate_input_ids_cpu",
              "build_tree_kernel_efficient_cpu", "assign_draft_cache_locs_contiguous_cpu"):
    globals()[_name] = _not_implemented(_name)
