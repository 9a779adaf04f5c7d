"""Verify-time sampling with plain SGLang's top-k / top-p / min-p semantics.

SGLang's speculative acceptance (``eagle_sample``) builds the target distribution as
top-k-renormalise, then top-p-renormalise, and ignores min-p. Plain SGLang's sampler does
not: with FlashInfer and no min-p it filters top-k and top-p *jointly* on the original
probabilities (``filter_apply_order="joint"``), and with min-p it applies top-k, top-p and
min-p in turn (the PyTorch backend: joint, then min-p). Where both top-k and top-p are set,
or min-p is, the two differ, and so would SPARSESPEC's output distribution (measured on an
H100 with scripts/check_sampling.py at T 0.7 / top-p 0.9 / top-k 20: p = 9e-6).

``sample_like_plain`` builds the filtered target distribution the way plain sampling does,
hands it to ``eagle_sample`` as logits with the already-applied filters switched off, and
restores the batch afterwards. Other batches go to ``eagle_sample`` untouched.
"""

from __future__ import annotations

import logging
import functools
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from sparsespec_sglang.compat import apply_scaling_penalties, eagle_sample

logger = logging.getLogger(__name__)


@functools.cache
def _warn_penalties() -> None:
    logger.warning("SPARSESPEC: frequency/presence/repetition penalties follow SGLang's speculative "
                   "semantics: every verified position sees the penalty state of the cycle's start, "
                   "so sampling with penalties is close to, not exactly, plain decoding's")


@functools.lru_cache(maxsize=None)
def chain_tree(num: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``retrieve_index``, ``retrieve_next_token`` and ``retrieve_next_sibling`` of ``num``
    chains of ``width`` nodes, as ``eagle_sample`` expects them (cached, never written)."""
    index = torch.arange(num * width, device=device, dtype=torch.int64).view(num, width)
    nxt = torch.arange(1, width + 1, device=device, dtype=torch.int64).repeat(num, 1)
    nxt[:, -1] = -1
    sibling = torch.full((num, width), -1, device=device, dtype=torch.int64)
    return index, nxt, sibling


def filter_probs(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                 min_ps: Optional[torch.Tensor], top_k_first: bool) -> torch.Tensor:
    """Renormalised ``probs`` (rows) after top-k / top-p / min-p filtering.

    ``top_k_first``: top-p is taken over the top-k-renormalised distribution (FlashInfer's
    path when min-p is on); otherwise top-k and top-p both see the original probabilities
    (joint). A token is kept by top-p when the mass strictly above it is at most ``top_p``
    (SGLang's PyTorch sampler). min-p keeps tokens with at least ``min_p`` x the largest kept
    probability."""
    top_ks, top_ps = top_ks.view(-1, 1), top_ps.view(-1, 1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device).view(1, -1)
    keep = rank < top_ks
    ranked = sorted_p
    if top_k_first:
        ranked = sorted_p * keep
        ranked = ranked / ranked.sum(dim=-1, keepdim=True)
    keep &= (torch.cumsum(ranked, dim=-1) - ranked) <= top_ps
    if min_ps is not None:
        keep &= sorted_p >= sorted_p[:, :1] * min_ps.view(-1, 1)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p * keep)
    return kept / kept.sum(dim=-1, keepdim=True)


def _filter_probs_kernels(probs: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                          min_ps: Optional[torch.Tensor], top_k_first: bool) -> torch.Tensor:
    """``filter_probs`` with the sgl_kernel renorm kernels plain SGLang samples with (no sort).

    Joint = top-p first: top-k of the nucleus is the shorter of two prefixes of one order."""
    from sgl_kernel import top_k_renorm_prob, top_p_renorm_prob

    if top_k_first:
        probs = top_p_renorm_prob(top_k_renorm_prob(probs, top_ks), top_ps)
    else:
        probs = top_k_renorm_prob(top_p_renorm_prob(probs, top_ps), top_ks)
    if min_ps is not None:
        probs = probs * (probs >= probs.amax(dim=-1, keepdim=True) * min_ps.view(-1, 1))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def needs_plain_filtering(info: Any) -> bool:
    """Whether ``eagle_sample``'s own filtering would differ from plain sampling for this batch."""
    return not info.is_all_greedy and (
        (info.need_top_k_sampling and info.need_top_p_sampling) or info.need_min_p_sampling)


@contextmanager
def _filters_off(info: Any) -> Iterator[None]:
    """Switch off the logit adjustments and filters already folded into the target logits."""
    names = ("need_top_k_sampling", "need_top_p_sampling", "need_min_p_sampling",
             "acc_additive_penalties", "acc_scaling_penalties", "logit_bias")
    saved = {name: getattr(info, name) for name in names}
    for name in names:
        setattr(info, name, False if name.startswith("need_") else None)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(info, name, value)


def sample_like_plain(verify_input: Any, batch: Any, logits_output: Any, grammar_mask: Any,
                      sampling_backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eagle_sample`` whose target distribution is the one plain SGLang samples from."""
    info = batch.sampling_info
    if info.acc_additive_penalties is not None or info.acc_scaling_penalties is not None:
        _warn_penalties()
    if not needs_plain_filtering(info):
        return eagle_sample(verify_input, batch, logits_output, grammar_mask)
    n = verify_input.draft_token_num

    def per_token(x: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(x, n, dim=0)

    original = logits_output.next_token_logits
    logits = original.float()
    # The adjustments eagle_sample makes before its filters, in its order and, like it, in
    # place (logprobs later read these logits).
    if info.acc_additive_penalties is not None:
        logits.add_(per_token(info.acc_additive_penalties))
    if info.acc_scaling_penalties is not None:
        apply_scaling_penalties(logits, per_token(info.acc_scaling_penalties))
    if info.logit_bias is not None:
        logits.add_(per_token(info.logit_bias))
    if grammar_mask is not None:
        grammar_mask.apply(logits)
    temperatures = per_token(info.temperatures).view(-1, 1)
    probs = torch.softmax(logits / temperatures, dim=-1)
    min_ps = per_token(info.min_ps) if info.need_min_p_sampling else None
    top_k_first = sampling_backend == "flashinfer" and info.need_min_p_sampling
    args = (probs, per_token(info.top_ks), per_token(info.top_ps), min_ps, top_k_first)
    probs = _filter_probs_kernels(*args) if probs.is_cuda else filter_probs(*args)
    # eagle_sample computes softmax(logits / T): T * log(p) gives back p (0 -> -inf).
    logits_output.next_token_logits = probs.log() * temperatures
    try:
        with _filters_off(info):
            return eagle_sample(verify_input, batch, logits_output, None)
    finally:
        logits_output.next_token_logits = original
