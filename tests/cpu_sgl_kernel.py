"""PyTorch stand-ins for the sgl_kernel ops SGLang's speculative sampling calls (test support only).

SGLang's ``eagle_sample`` samples through CUDA-only sgl_kernel ops, and on a CPU it takes the
argmax whatever the temperature. These stand-ins let a CPU test run SGLang's *real* sampled
acceptance around them, so what is under test is the plugin's path into it (the schedule's
chain layout, the per-request sampling parameters, plain's filtering): a lossy path there shows
as a distribution that differs from plain sampling.

Semantics follow sgl_kernel's ``tree_speculative_sampling_target_only`` on a chain (one draft per
depth; the plugin drafts chains only): at depth j the draft ``c[j+1]`` is accepted when
``coin[j] <= q_j(c[j+1]) / threshold_acc`` or ``q_j(c[j+1]) >= threshold_single``; at the first
rejection the next token is drawn with the final coin from q_j with the rejected draft's mass
removed (the residual of a point-mass draft), and after a fully accepted chain from the last
row's q. The renorm ops keep the top-k tokens (ties: all at the k-th value), or the smallest
prefix in descending order whose mass reaches top-p.
"""

from __future__ import annotations

import sys
import types

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


def module() -> types.ModuleType:
    """A module named ``sgl_kernel`` holding the stand-ins (install it in ``sys.modules``)."""
    mod = types.ModuleType("sgl_kernel")
    mod.__file__ = __file__
    for fn in (top_k_renorm_prob, top_p_renorm_prob, tree_speculative_sampling_target_only):
        setattr(mod, fn.__name__, fn)
    return mod


def install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sgl_kernel", module())


def sampled_eagle_sample_on_cpu(monkeypatch) -> None:
    """Make SGLang's ``eagle_sample`` take its sampled branch on a CPU, one process, no TP.

    0.5.17 imports the sampling ops from sgl_kernel inside the call; from 0.5.23 they are names
    of ``eagle_utils`` resolved per platform at import (None on a CPU). Both take the argmax on a
    CPU (``_is_cpu``) and read the accept thresholds from ``get_spec()``."""
    from sglang.srt.speculative import eagle_utils

    install(monkeypatch)
    monkeypatch.setattr(eagle_utils, "_is_cpu", False)
    for fn in (top_k_renorm_prob, top_p_renorm_prob, tree_speculative_sampling_target_only):
        if hasattr(eagle_utils, fn.__name__):
            monkeypatch.setattr(eagle_utils, fn.__name__, fn)
    spec = types.SimpleNamespace(speculative_use_rejection_sampling=False, speculative_accept_threshold_single=1.0,
                                 speculative_accept_threshold_acc=1.0, speculative_use_block_verification=False)
    monkeypatch.setattr(eagle_utils, "get_spec", lambda: spec)
    one = types.SimpleNamespace(world_size=1)
    parallel = types.SimpleNamespace(tp_group=one, attn_tp_group=one)
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel", lambda: parallel)
    if hasattr(eagle_utils, "get_parallel"):
        monkeypatch.setattr(eagle_utils, "get_parallel", lambda: parallel)
    monkeypatch.setattr("sglang.srt.distributed.get_tp_group", lambda: one, raising=False)
    monkeypatch.setattr("sglang.srt.layers.dp_attention.is_dp_attention_enabled", lambda: False)
