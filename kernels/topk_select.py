"""Exact per-(request, KV head) top-K selection of PillarAttn scores, on the GPU.

Why this kernel exists: after every verify, each layer turns its ``[B, Hkv, ctx]`` score table
(from ``verify_attention_with_scores``) into the sparse index set of the next k draft steps: the
K_b highest-scoring candidate positions of every (request, KV head), as KV slot ids.
``torch.topk`` on a padded table would need per-request K and candidate ranges (ragged, so a
host loop or masking plus a second gather) and allocates; this kernel does it in one launch with
a fixed grid, writing into preallocated buffers — no host sync, CUDA-graph friendly.

Algorithm (one program per (request, KV head), exact, deterministic):

* Non-negative fp32 values order like their int32 bit patterns, so the K-th largest value is
  found digit by digit over the bits: 8 passes of a 4-bit radix select (bits 31..0). Each pass
  counts, among candidates whose high bits equal the prefix found so far, how many have each
  value of the next 4 bits. Triton has no portable histogram op, so the 16 counters live in two
  int64 words per lane (8 bits per counter) and are folded into int32 totals every 255 blocks —
  a few integer ops per element instead of 16 comparisons.
* One compaction pass in position order then takes every candidate above the threshold plus
  the first (lowest-position) ties equal to it until K are taken, using block prefix sums for
  the output offsets, and writes ``req_to_token[r, p]`` for each taken position. The output
  row is therefore sorted by position.

Cost: 9 coalesced reads of the candidate scores (+ one read of the taken ``req_to_token``
entries) per (request, KV head); when K covers all candidates the 8 radix passes are skipped.
Scores are assumed >= 0; negative values (and -0.0) rank as 0, NaN ranks above +inf.
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

_BLOCK = 1024
# 8-bit counters in the packed int64 words overflow after 255 increments per lane.
_FLUSH_BLOCKS = 255


class TopKPolicy(Protocol):
    """The selection numbers the kernel reads (``sparsespec_sglang.selection.SelectionPolicy``
    has them; this module imports nothing from the package, so the kernel stays a leaf). The
    host methods are what the PyTorch reference computes K and R with."""

    sparsity_ppm: int  # sparsity in parts per million
    min_selected: int
    max_selected: int
    num_sink: int
    recent_ppm: int  # share of K that is the most recent candidates, parts per million

    def num_selected(self, context_len: int, cand_end: int | None = None) -> int: ...

    def num_recent(self, k: int) -> int: ...

    def num_candidates(self, cand_end: int) -> int: ...


# K and R inside the kernel: the integer formulas of SelectionPolicy.num_selected and
# selection.num_recent (ceil and round half up in parts per million), which the host, torch and
# this kernel must compute identically (tests/test_selection.py checks them against each other).
@triton.jit
def num_selected_device(context_len, cand_end, sparsity_ppm, min_sel, max_sel, num_sink):
    """K of one request inside a Triton kernel (int32 scalars in, int32 out)."""
    want = ((context_len.to(tl.int64) * sparsity_ppm + 999_999) // 1_000_000).to(tl.int32)
    n_cand = tl.maximum(cand_end - num_sink, 0)
    return tl.minimum(tl.minimum(tl.maximum(want, min_sel), max_sel), n_cand)


@triton.jit
def num_recent_device(k, recent_ppm):
    """Of K selected positions, how many are the most recent candidates (int32 in, int32 out)."""
    return ((k.to(tl.int64) * recent_ppm + 500_000) // 1_000_000).to(tl.int32)


@triton.jit
def _radix_digit_counts(
    score_row,
    cand_start,
    cand_end,
    prefix,
    SHIFT: tl.constexpr,
    BLOCK: tl.constexpr,
    FLUSH_BLOCKS: tl.constexpr,
):
    """Counts, per value of bits [SHIFT, SHIFT+4), of the candidates whose bits above SHIFT+4
    equal those of `prefix`."""
    bins = tl.arange(0, 16)
    counts = tl.zeros([16], dtype=tl.int32)
    for c0 in range(cand_start, cand_end, BLOCK * FLUSH_BLOCKS):
        c1 = tl.minimum(c0 + BLOCK * FLUSH_BLOCKS, cand_end)
        lo = tl.zeros([BLOCK], dtype=tl.int64)  # digits 0..7, one byte each
        hi = tl.zeros([BLOCK], dtype=tl.int64)  # digits 8..15
        for n0 in range(c0, c1, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            ok = offs < c1
            bits = tl.load(score_row + offs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
            bits = tl.maximum(bits, 0)
            digit = (bits >> SHIFT) & 15
            if SHIFT < 28:
                match = ok & ((bits >> (SHIFT + 4)) == (prefix >> (SHIFT + 4)))
            else:
                match = ok
            one = tl.where(match, tl.full([BLOCK], 1, tl.int64) << ((digit & 7) * 8).to(tl.int64), 0)
            lo += tl.where(digit < 8, one, 0)
            hi += tl.where(digit < 8, 0, one)
        # Unpack one word at a time ([BLOCK, 8] instead of [BLOCK, 16]: half the registers).
        byte = tl.arange(0, 8)
        lo_counts = tl.sum(((lo[:, None] >> (byte * 8).to(tl.int64)[None, :]) & 255).to(tl.int32), 0)
        hi_counts = tl.sum(((hi[:, None] >> (byte * 8).to(tl.int64)[None, :]) & 255).to(tl.int32), 0)
        place = (bins[:, None] & 7) == byte[None, :]  # [16, 8]: digit d is byte d % 8 of its word
        per_digit = tl.where((bins < 8)[:, None], lo_counts[None, :], hi_counts[None, :])
        counts += tl.sum(tl.where(place, per_digit, 0), 1)
    return counts


@triton.jit
def _select_topk_kernel(
    Scores,
    Req_To_Token,
    Req_Pool_Indices,
    Seq_Lens,
    Cand_End,
    Out_Indices,
    Out_Lens,
    Out_Recent,
    num_sink,
    sparsity_ppm,
    recent_ppm,
    min_sel,
    max_sel,
    stride_sl,
    stride_sb,
    stride_sh,
    stride_r2t,
    stride_ol,
    stride_ob,
    stride_oh,
    BLOCK: tl.constexpr,
    FLUSH_BLOCKS: tl.constexpr,
    HAS_RECENT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    layer = tl.program_id(2).to(tl.int64)
    Scores += layer * stride_sl
    Out_Indices += layer * stride_ol
    r = tl.load(Req_Pool_Indices + b).to(tl.int64)
    out_b = r  # written at the request's pool row

    seq_len = tl.load(Seq_Lens + b)
    cand_end = tl.load(Cand_End + b)
    k = num_selected_device(seq_len, cand_end, sparsity_ppm, min_sel, max_sel, num_sink)
    # The recent part of K is the R candidates just before cand_end: the caller starts the
    # dense tail there, so only the K - R best of the older candidates are listed.
    recent = num_recent_device(k, recent_ppm)
    k -= recent
    cand_end -= recent
    n_cand = tl.maximum(cand_end - num_sink, 0)
    if (h == 0) & (layer == 0):
        tl.store(Out_Lens + out_b, k)
        if HAS_RECENT:
            tl.store(Out_Recent + out_b, recent)

    if k > 0:
        score_row = Scores + b * stride_sb + h * stride_sh
        threshold = tl.zeros_like(k) - 1  # fast path, k == n_cand: every candidate is above it
        ties_to_take = tl.zeros_like(k)
        if k < n_cand:
            bins = tl.arange(0, 16)
            prefix = tl.zeros_like(k)  # bits of the K-th largest value found so far
            remaining = k  # how many still to take among candidates matching the prefix
            for i in tl.static_range(8):
                counts = _radix_digit_counts(
                    score_row, num_sink, cand_end, prefix, 28 - 4 * i, BLOCK, FLUSH_BLOCKS
                )
                at_or_above = tl.sum(tl.where(bins[None, :] >= bins[:, None], counts[None, :], 0), 1)
                digit = tl.max(tl.where(at_or_above >= remaining, bins, 0), 0)
                remaining -= tl.sum(tl.where(bins > digit, counts, 0), 0)
                prefix = prefix | (digit << (28 - 4 * i))
            threshold = prefix
            ties_to_take = remaining

        r2t_row = Req_To_Token + r * stride_r2t
        out_row = Out_Indices + out_b * stride_ob + h * stride_oh
        taken = 0
        ties_seen = 0
        for n0 in range(num_sink, cand_end, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            ok = offs < cand_end
            bits = tl.load(score_row + offs, mask=ok, other=0.0).to(tl.int32, bitcast=True)
            bits = tl.maximum(bits, 0)
            tie = (ok & (bits == threshold)).to(tl.int32)
            tie_rank = ties_seen + tl.cumsum(tie, 0) - tie
            take = (ok & (bits > threshold)) | ((tie > 0) & (tie_rank < ties_to_take))
            take_i = take.to(tl.int32)
            dst = taken + tl.cumsum(take_i, 0) - take_i
            slot = tl.load(r2t_row + offs, mask=take, other=0)
            tl.store(out_row + dst, slot, mask=take)
            taken += tl.sum(take_i, 0)
            ties_seen += tl.sum(tie, 0)


def select_topk(
    scores: torch.Tensor,
    policy: TopKPolicy,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    cand_end: torch.Tensor,
    out_indices: torch.Tensor,
    out_lens: torch.Tensor,
    out_recent: torch.Tensor | None = None,
) -> None:
    """Slot ids of the K_b best candidate positions [policy.num_sink, cand_end[b]) per (b, KV head).

    K_b = ``policy.num_selected(seq_lens[b], cand_end[b])`` (``sparsespec_sglang.selection``'s
    integer formula, computed here on the GPU). With a recent share (``policy.recent_ppm``, the
    hybrid and window selections) R_b = ``policy.num_recent(K_b)`` of them are the most recent
    candidates [cand_end[b] - R_b, cand_end[b]): they are not listed, R_b goes to
    ``out_recent[b]`` (the caller's dense tail starts there), and the K_b - R_b best-scored of
    [policy.num_sink, cand_end[b] - R_b) are written, their count to ``out_lens``. Shapes: scores [B, Hkv, >= max cand_end] fp32;
    req_to_token [max_reqs, max_ctx] int32; req_pool_indices, seq_lens, cand_end [B] int32;
    out_indices [rows, Hkv, >= policy.max_selected] int32 and out_lens, out_recent [rows] int32
    are the whole pool's tables, written at row r = ``req_pool_indices[b]`` (entries
    [r, h, :K_b], sorted by position, rest untouched), so no scatter from batch order is needed.

    Several layers in one launch: scores [L, B, Hkv, ctx] and out_indices [L, ..., Hkv, max_sel]
    (the same K_b for every layer, so out_lens is written once). One launch per layer is
    latency-bound when B is small (a unified pass verifies ~B / (k + 1) requests); one launch
    over a group of layers fills the GPU.
    """
    if scores.dim() == 3:
        scores = scores.unsqueeze(0)
    if out_indices.dim() == 3:
        out_indices = out_indices.unsqueeze(0)
    num_layers, batch, num_kv_heads = scores.shape[:3]
    assert out_indices.dim() == 4 and out_indices.shape[0] == num_layers
    assert out_indices.shape[2] == num_kv_heads and out_indices.shape[3] >= policy.max_selected
    assert scores.dtype == torch.float32 and scores.stride(3) == 1
    assert req_to_token.stride(1) == 1 and out_indices.stride(3) == 1
    assert policy.recent_ppm == 0 or out_recent is not None, "a recent share needs out_recent"
    if batch == 0 or num_layers == 0:
        return
    _select_topk_kernel[(batch, num_kv_heads, num_layers)](
        scores,
        req_to_token,
        req_pool_indices,
        seq_lens,
        cand_end,
        out_indices,
        out_lens,
        out_lens if out_recent is None else out_recent,
        policy.num_sink,
        policy.sparsity_ppm,
        policy.recent_ppm,
        policy.min_selected,
        policy.max_selected,
        scores.stride(0),
        scores.stride(1),
        scores.stride(2),
        req_to_token.stride(0),
        out_indices.stride(0),
        out_indices.stride(1),
        out_indices.stride(2),
        BLOCK=_BLOCK,
        FLUSH_BLOCKS=_FLUSH_BLOCKS,
        HAS_RECENT=out_recent is not None,
        num_warps=8,
    )


def select_topk_ref(
    scores: torch.Tensor,
    policy: TopKPolicy,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    cand_end: torch.Tensor,
    out_indices: torch.Tensor,
    out_lens: torch.Tensor,
    out_recent: torch.Tensor | None = None,
) -> None:
    """PyTorch reference with the kernel's contract (ties -> lower position, output by position;
    one layer: scores [B, Hkv, ctx], out_indices [rows, Hkv, max_sel])."""
    num_sink = policy.num_sink
    for b in range(scores.shape[0]):
        k = policy.num_selected(int(seq_lens[b]), int(cand_end[b]))
        recent = policy.num_recent(k)
        k -= recent
        n_cand = policy.num_candidates(int(cand_end[b]) - recent)
        r = int(req_pool_indices[b])
        out_lens[r] = k
        if out_recent is not None:
            out_recent[r] = recent
        row = req_to_token[r]
        for h in range(scores.shape[1]):
            if k == 0:
                continue
            cand = scores[b, h, num_sink:num_sink + n_cand]
            keys = cand.contiguous().view(torch.int32).clamp_min(0)  # fp32 order for values >= 0
            order = torch.sort(keys, descending=True, stable=True).indices[:k]
            positions = torch.sort(order).values + num_sink
            out_indices[r, h, :k] = row[positions].to(out_indices.dtype)
