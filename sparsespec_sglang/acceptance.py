"""Acceptance: which of a verify's chain tokens each request keeps. Decided here and nowhere else.

Both schedules verify chains of the pending token + drafts and call :func:`accept` on the verify
logits; it returns what :meth:`PillarState.commit <sparsespec_sglang.pillar.PillarState.commit>`
and SGLang's spec-v2 result need (:class:`Accepted`). Why the output is lossless:

* The drafts are the sparse model's argmax, a deterministic proposal, so SGLang's target-only
  chain acceptance (``eagle_sample``) is exact prefix matching under greedy decoding and exact
  speculative sampling for temperature > 0 -- provided its target distribution is the one plain
  SGLang samples from, which is not always the case (below).
* The target distribution. ``eagle_sample`` builds it as top-k-renormalise, then
  top-p-renormalise, and ignores min-p. Plain SGLang's sampler does not: with FlashInfer and no
  min-p it filters top-k and top-p *jointly* on the original probabilities
  (``filter_apply_order="joint"``), and with min-p it applies top-k, top-p and min-p in turn (the
  PyTorch backend: joint, then min-p). Where both top-k and top-p are set, or min-p is, the two
  differ, and so would SPARSESPEC's output distribution (measured on an H100 with
  scripts/check_sampling.py at T 0.7 / top-p 0.9 / top-k 20: p = 9e-6). ``sample_like_plain``
  builds the filtered target distribution the way plain sampling does, hands it to
  ``eagle_sample`` as logits with the already-applied filters switched off, and restores the
  batch afterwards. Other batches go to ``eagle_sample`` untouched. A grammar's vocabulary mask
  applies to the target logits too (the drafts ignore the grammar, the verify must not).
* Which requests' sampling parameters: a unified pass verifies a subset of the batch, so the
  per-request sampling tensors are taken for that subset, in chain order.
* A chain shorter than the widest (a unified pass verifies whatever a request drafted) accepts
  at most its own length, also when SGLang forces acceptance lengths for benchmarks.
"""

from __future__ import annotations

import copy
import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
from sparsespec_sglang.compat import (
    ForwardMode,
    NgramVerifyInput,
    apply_scaling_penalties,
    build_grammar_vocab_mask,
    eagle_sample,
)

logger = logging.getLogger(__name__)


@functools.cache
def _warn_penalties() -> None:
    logger.warning("SPARSESPEC: frequency/presence/repetition penalties follow SGLang's speculative "
                   "semantics: every verified position sees the penalty state of the step's start, "
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


def verify_chains(draft_tokens: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor,
                  width: int, next_token: Optional[torch.Tensor] = None) -> NgramVerifyInput:
    """The chain-verify input of ``n = len(prefix)`` chains of ``width`` nodes: ``draft_tokens``
    and ``positions`` [n * width] (chain v at [v * width:]), ``prefix`` [n] each request's
    committed length before the verify. ``next_token`` [n, width]: where each chain really ends
    (``retrieve_next_token``, -1 after its last node); None: every chain is ``width`` long.

    No tree mask: the PillarAttn verify kernel is causal over the chain (and NgramVerifyInput
    then takes its device from ``new_seq_lens``, the prefix)."""
    index, nxt, sibling = chain_tree(prefix.shape[0], width, prefix.device)
    return NgramVerifyInput(
        draft_token=draft_tokens, custom_mask=None, positions=positions, retrieve_index=index,
        retrieve_next_token=nxt if next_token is None else next_token, retrieve_next_sibling=sibling,
        draft_token_num=width, new_seq_lens=prefix,
    )


@dataclass(frozen=True)
class Accepted:
    """What a verify of n chains accepted, in chain order (all on the GPU, nothing synced)."""

    tokens: torch.Tensor  # [n, width] int32: chain v's accepted tokens at [v, :lens[v]] (the rest unused)
    lens: torch.Tensor  # [n] int32, 1..its chain length (the bonus token included)
    last_tokens: torch.Tensor  # [n] each request's last accepted token: the first token of its next verify chain
    new_seq_lens: torch.Tensor  # [n] committed lengths after the verify (prefix + lens)
    predict: torch.Tensor  # eagle_sample's flat predictions (SGLang's logprob helpers read them)
    accept_index: torch.Tensor  # [n, width] eagle_sample's indices into predict (-1: not accepted)


def accept(verify_input: NgramVerifyInput, batch: Any, logits_output: Any, sampling_backend: str, *,
           requests: Optional[torch.Tensor] = None, chain_lens: Optional[torch.Tensor] = None,
           grammar_tree: Any = None) -> Accepted:
    """Acceptance of the chains of ``verify_input`` (:func:`verify_chains`) from their verify
    logits (``logits_output.next_token_logits`` [n * width, vocab]).

    ``requests`` [n]: the batch indices of the verifying requests (a unified pass verifies a
    subset); None: every request of ``batch`` in batch order, and ``batch`` is in its verify form
    (``TARGET_VERIFY``, ``seq_lens`` the prefixes), as SGLang's own verifiers hand it over.
    ``chain_lens`` [n]: each chain's length when some are shorter than ``width`` (None: all full,
    so no acceptance can run past a chain). ``grammar_tree``: the chains as SGLang's
    ``GrammarTree`` (copied to the host before the verify launch) when the batch has a grammar.
    ``sampling_backend``: plain SGLang's sampler backend, whose filtering the target follows."""
    width = verify_input.draft_token_num
    prefix = verify_input.new_seq_lens
    device = verify_input.device
    grammar_mask = None
    if grammar_tree is not None:
        grammar_mask = build_grammar_vocab_mask(
            reqs=batch.reqs, tree=grammar_tree, sampling_info=batch.sampling_info, device=device,
            barrier=None)
    if requests is not None:
        info = batch.sampling_info
        batch = SimpleNamespace(
            device=device, forward_mode=ForwardMode.TARGET_VERIFY, seq_lens=prefix,
            sampling_info=info if _greedy_only(info) else select_requests(info, requests, len(batch.reqs)))
    predict, lens, accept_index = sample_like_plain(verify_input, batch, logits_output, grammar_mask,
                                                    sampling_backend)
    if chain_lens is not None:
        lens = torch.minimum(lens, chain_lens)
    n = prefix.shape[0]
    tokens = predict[accept_index].view(n, width).to(torch.int32)
    last = tokens[torch.arange(n, device=device), lens.long() - 1]
    return Accepted(tokens, lens, last, prefix + lens, predict, accept_index)


def select_requests(info: Any, index: torch.Tensor, batch_size: int) -> Any:
    """``SamplingBatchInfo`` of a subset of the batch's requests (per-request tensors indexed)."""
    sub = copy.copy(info)
    for name, value in vars(info).items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
            setattr(sub, name, value[index])
    return sub


def _greedy_only(info: Any) -> bool:
    """No per-request tensor of the sampling info is read (argmax acceptance, no adjustments)."""
    return (info.is_all_greedy and info.acc_additive_penalties is None
            and info.acc_scaling_penalties is None and info.logit_bias is None)


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
