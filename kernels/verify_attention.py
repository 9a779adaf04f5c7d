"""Verify attention with the PillarAttn score dump.

Why this kernel exists: the verify pass of SparseSpec runs full causal attention for the k+1
verify tokens of each request, and PillarAttn reuses that pass to decide which KV tokens the next
k draft steps attend to. For every request b, KV head h and cached position p it writes

    score[b, h, p] = AGG_{i, hq in group(h)} exp(s[i, hq, p] - lse[i, hq])

(the softmax probability of p under verify query i and query head hq, normalised with the row's
log-sum-exp; a position after the query, p > prefix + i, contributes 0; AGG is sum or max).
``select_topk`` turns these scores into the next sparse index set.

Design (three launches in exact mode, two in draft-normalised mode, no host sync;
``verify_attention`` is launches 1-2 alone, the plain verify that the bench compares against):

1. ``_verify_fwd``: flash attention over the paged KV, one program per (request, KV head,
   KV split) covering all ``G * extend_len`` rows (query token x query head of the GQA group) of
   that request, so each K/V row is read once per group. Query i sees positions
   ``[0, prefix + i]`` read through ``req_to_token`` (the verify tokens' own KV is already in
   the pool). With one split it writes ``out`` and the row lse directly; with several it writes
   fp32 partials that
2. ``_verify_reduce`` merges (flash-decoding style, for small batches where B * Hkv programs
   cannot fill the GPU).
3. ``_verify_scores``: the score needs the *final* row lse, which is only known after the whole
   row has been seen, so a second, K-only pass recomputes ``q . k`` for every position with the
   known lse, aggregates over the G * extend_len rows in registers and writes one fp32 per
   (request, KV head, position). It never reads V.

Cost relative to a plain verify (``verify_attention``), per request and layer, with context
length C, Hkv KV heads, head dims D/Dv, KV element size e bytes:

* plain verify reads K+V once: ``C * Hkv * (D + Dv) * e`` bytes (+ q, out, and with S > 1 KV
  splits ``(k+1) * Hq * S * (Dv + 1) * 4`` bytes of partials written and read back: negligible
  next to the KV at long contexts).
* the score pass reads K again: ``+ C * Hkv * D * e`` bytes, i.e. **+50% KV bytes for D == Dv**,
  writes ``C * Hkv * 4`` bytes of scores (+0.8% for D = Dv = 128 in bf16), and does one more
  QK^T matmul (+50% matmul FLOPs). So the "free" score dump of the paper is not free here: it
  costs one extra K read per verify.

The alternatives are not cheaper: keeping the per-row logits of pass 1 and normalising later
means writing and re-reading ``G * (k+1) * 4`` bytes per position and KV head (288 B for G=4,
k+1=9 — more than the 256 B of one bf16 K row of D=128), and the unnormalised running sum of
pass 1 cannot be corrected afterwards because every row has its own (changing) running max.
So exact scores cost ~1.5x the memory traffic of a plain verify (+66% time on an H100).

The draft-normalised mode (``score_lse``) drops pass 3: each row is normalised by the lse its
token's *draft step* computed over its sparse set, known before the verify starts, so pass 1
adds the scaled probabilities of every tile to the scores (one exp per row, a reduction over
the rows and one fp32 store per position: +10-11% time on an H100). Rows are weighted by
1 / (mass the draft's sparse attention captured) relative to exact scores; the choice only
steers which tokens later drafts attend to, never the verified output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import batch_sum, kv_split_range, merge_splits, pick_split_launch, tanh

AGGREGATIONS = ("sum", "max")  # how the score dump pools queries and GQA heads (AGG_MAX or a sum)

_BLOCK_N = 64


@triton.jit
def _request_split_range(Prefix_Lens, Extend_Lens, batch, total, split, num_kv_splits, target_programs,
                         BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BY_LENGTH: tl.constexpr):
    """This program's [start, end) of a request's ``total`` KV positions (``kv_split_range``; with
    BY_LENGTH the batch's tokens are summed from the length vectors, grid axis 1 is the KV heads)."""
    if BY_LENGTH:
        batch_work = batch_sum(Prefix_Lens, Extend_Lens, batch, BLOCK_B)
    else:
        batch_work = 0
    return kv_split_range(total, batch_work, split, num_kv_splits, target_programs, tl.num_programs(1),
                          BLOCK_N, BY_LENGTH)


@triton.jit
def _verify_fwd(
    Q,
    K_Buffer,
    V_Buffer,
    Req_To_Token,
    Req_Pool_Indices,
    Prefix_Lens,
    Extend_Lens,
    Qo_Indptr,
    Out,
    Lse,
    Row_Lse,
    Ring_Rows,
    Scores,
    sm_scale,
    num_kv_splits,
    target_programs,
    batch,
    stride_qt,
    stride_qh,
    stride_kbs,
    stride_kh,
    stride_vbs,
    stride_vh,
    stride_r2t,
    stride_ot,
    stride_oh,
    stride_os,
    stride_lt,
    stride_lh,
    stride_rlb,
    stride_rlh,
    stride_sb,
    stride_sh,
    G: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BY_LENGTH: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    SPLIT: tl.constexpr,
    RING: tl.constexpr,
    RING_BY_ROWS: tl.constexpr,
    AGG_MAX: tl.constexpr,
):
    """Out/Lse are the final out [T, Hq, Dv] / lse [T, Hq] when not SPLIT, else fp32 partials
    [T, Hq, splits, Dv] / [T, Hq, splits] (stride_os is the split stride of both).

    RING > 0 fuses the score dump: Row_Lse [B, Hq, RING] holds each row's normaliser ahead of
    time (the draft steps' sparse lse by position modulo RING; see ``score_lse`` below) and
    every tile adds its aggregated probabilities to Scores [B, Hkv, ctx]."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)

    r = tl.load(Req_Pool_Indices + b).to(tl.int64)
    prefix = tl.load(Prefix_Lens + b)
    n_ext = tl.load(Extend_Lens + b)
    q_start = tl.load(Qo_Indptr + b).to(tl.int64)
    total = prefix + n_ext
    kv_start, kv_end = _request_split_range(Prefix_Lens, Extend_Lens, batch, total, split, num_kv_splits,
                                            target_programs, BLOCK_N, BLOCK_B, BY_LENGTH)
    if SPLIT:
        if kv_start >= kv_end:
            # A split past this request's share: only its -inf lse, which the merge skips (its
            # partial output is never read).
            for m0 in range(0, n_ext * G, BLOCK_M):
                rows = m0 + tl.arange(0, BLOCK_M)
                tl.store(Lse + (q_start + rows // G) * stride_lt + (h * G + rows % G) * stride_lh + split,
                         tl.full([BLOCK_M], float("-inf"), tl.float32), mask=rows < n_ext * G)
            return

    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV
    r2t_row = Req_To_Token + r * stride_r2t

    for m0 in range(0, n_ext * G, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_ext * G
        qi = rows // G
        hq = h * G + rows % G
        tok = q_start + qi
        last_pos = prefix + qi
        q = tl.load(
            Q + tok[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & mask_d[None, :],
            other=0.0,
        ).to(K_Buffer.dtype.element_ty)
        # No row of this block sees past its last query token (the fused score dump walks the
        # whole split so that every position of it is written by the first row block).
        if RING > 0:
            block_end = kv_end
            # Row i was draft step min(i, n_ext - 2)'s query (the bonus row reuses the last).
            lse_pos = prefix + tl.maximum(tl.minimum(qi, n_ext - 2), 0)
            ring_b = tl.load(Ring_Rows + b).to(tl.int64) if RING_BY_ROWS else b
            row_lse = tl.load(
                Row_Lse + ring_b * stride_rlb + hq * stride_rlh + lse_pos % RING, mask=row_ok, other=0.0
            )
        else:
            block_end = tl.minimum(kv_end, prefix + tl.minimum((m0 + BLOCK_M - 1) // G, n_ext - 1) + 1)

        e_max = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        e_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        for n0 in range(kv_start, block_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pos_ok = pos < block_end
            slot = tl.load(r2t_row + pos, mask=pos_ok, other=0).to(tl.int64)
            k = tl.load(
                K_Buffer + slot[None, :] * stride_kbs + h * stride_kh + offs_d[:, None],
                mask=pos_ok[None, :] & mask_d[:, None],
                other=0.0,
            )
            qk = tl.dot(q, k) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh(qk / LOGIT_CAP)
            qk = tl.where(pos_ok[None, :] & (pos[None, :] <= last_pos[:, None]), qk, float("-inf"))
            v = tl.load(
                V_Buffer + slot[:, None] * stride_vbs + h * stride_vh + offs_dv[None, :],
                mask=pos_ok[:, None] & mask_dv[None, :],
                other=0.0,
            )
            n_e_max = tl.maximum(tl.max(qk, 1), e_max)
            # A row with nothing visible yet keeps max -inf; shift by 0 so it stays 0, not NaN.
            shift = tl.where(n_e_max == float("-inf"), 0.0, n_e_max)
            re_scale = tl.exp(e_max - shift)
            p = tl.exp(qk - shift[:, None])
            if RING > 0:
                # exp(qk - row_lse) = p * exp(shift - row_lse): one exp per row, not per element.
                # Capped at e^60 so a row whose normaliser is far off cannot overflow the sum.
                to_row = tl.where(row_ok, tl.exp(tl.minimum(shift - row_lse, 60.0)), 0.0)
                prob = p * to_row[:, None]
                if AGG_MAX:
                    agg = tl.max(prob, 0)
                else:
                    agg = tl.sum(prob, 0)
                score_ptrs = Scores + b.to(tl.int64) * stride_sb + h * stride_sh + pos
                if m0 > 0:
                    prev = tl.load(score_ptrs, mask=pos_ok, other=0.0)
                    if AGG_MAX:
                        agg = tl.maximum(agg, prev)
                    else:
                        agg = agg + prev
                tl.store(score_ptrs, agg, mask=pos_ok)
            acc = acc * re_scale[:, None] + tl.dot(p.to(v.dtype), v)
            e_sum = e_sum * re_scale + tl.sum(p, 1)
            e_max = n_e_max

        has = e_sum > 0
        acc = acc / tl.where(has, e_sum, 1.0)[:, None]
        lse = tl.where(has, e_max + tl.log(tl.where(has, e_sum, 1.0)), float("-inf"))
        o_ptrs = Out + tok[:, None] * stride_ot + hq[:, None] * stride_oh + offs_dv[None, :]
        l_ptrs = Lse + tok * stride_lt + hq * stride_lh
        if SPLIT:
            tl.store(o_ptrs + split * stride_os, acc, mask=row_ok[:, None] & mask_dv[None, :])
            tl.store(l_ptrs + split, lse, mask=row_ok)
        else:
            tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=row_ok[:, None] & mask_dv[None, :])
            tl.store(l_ptrs, lse, mask=row_ok)


@triton.jit
def _verify_reduce(
    Part_Out,
    Part_Lse,
    Out,
    Lse,
    Qo_Indptr,
    batch,
    num_kv_splits,
    stride_pt,
    stride_ph,
    stride_ps,
    stride_plt,
    stride_plh,
    stride_ot,
    stride_oh,
    stride_lt,
    stride_lh,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    # Only the verify rows: in a unified pass the other rows of q/out are draft rows.
    if (t < tl.load(Qo_Indptr)) | (t >= tl.load(Qo_Indptr + batch)):
        return
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV
    out, lse = merge_splits(Part_Out + t * stride_pt + hq * stride_ph, Part_Lse + t * stride_plt + hq * stride_plh,
                            stride_ps, num_kv_splits, offs_dv, mask_dv, BLOCK_DV)
    tl.store(Out + t * stride_ot + hq * stride_oh + offs_dv, out.to(Out.dtype.element_ty), mask=mask_dv)
    tl.store(Lse + t * stride_lt + hq * stride_lh, lse)


@triton.jit
def _verify_scores(
    Q,
    K_Buffer,
    Req_To_Token,
    Req_Pool_Indices,
    Prefix_Lens,
    Extend_Lens,
    Qo_Indptr,
    Lse,
    Scores,
    sm_scale,
    num_kv_splits,
    target_programs,
    batch,
    stride_qt,
    stride_qh,
    stride_kbs,
    stride_kh,
    stride_r2t,
    stride_lt,
    stride_lh,
    stride_sb,
    stride_sh,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BY_LENGTH: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    AGG_MAX: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)

    r = tl.load(Req_Pool_Indices + b).to(tl.int64)
    prefix = tl.load(Prefix_Lens + b)
    n_ext = tl.load(Extend_Lens + b)
    q_start = tl.load(Qo_Indptr + b).to(tl.int64)
    total = prefix + n_ext
    kv_start, kv_end = _request_split_range(Prefix_Lens, Extend_Lens, batch, total, split, num_kv_splits,
                                            target_programs, BLOCK_N, BLOCK_B, BY_LENGTH)

    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    r2t_row = Req_To_Token + r * stride_r2t
    score_row = Scores + b * stride_sb + h * stride_sh

    # Usually a single row block (G * (k+1) <= BLOCK_M); later blocks fold into the stored value.
    for m0 in range(0, n_ext * G, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_ext * G
        qi = rows // G
        hq = h * G + rows % G
        tok = q_start + qi
        last_pos = prefix + qi
        q = tl.load(
            Q + tok[:, None] * stride_qt + hq[:, None] * stride_qh + offs_d[None, :],
            mask=row_ok[:, None] & mask_d[None, :],
            other=0.0,
        ).to(K_Buffer.dtype.element_ty)
        lse = tl.load(Lse + tok * stride_lt + hq * stride_lh, mask=row_ok, other=0.0)
        for n0 in range(kv_start, kv_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            pos_ok = pos < kv_end
            slot = tl.load(r2t_row + pos, mask=pos_ok, other=0).to(tl.int64)
            k = tl.load(
                K_Buffer + slot[None, :] * stride_kbs + h * stride_kh + offs_d[:, None],
                mask=pos_ok[None, :] & mask_d[:, None],
                other=0.0,
            )
            qk = tl.dot(q, k) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh(qk / LOGIT_CAP)
            seen = row_ok[:, None] & pos_ok[None, :] & (pos[None, :] <= last_pos[:, None])
            prob = tl.where(seen, tl.exp(qk - lse[:, None]), 0.0)
            if AGG_MAX:
                agg = tl.max(prob, 0)
            else:
                agg = tl.sum(prob, 0)
            if m0 > 0:
                prev = tl.load(score_row + pos, mask=pos_ok, other=0.0)
                if AGG_MAX:
                    agg = tl.maximum(agg, prev)
                else:
                    agg = agg + prev
            tl.store(score_row + pos, agg, mask=pos_ok)


def _blocks(num_tokens: int, batch: int, group: int, dv: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps): rows per program are G * tokens per request; the mean sizes the
    block (shape-only), a longer request loops over row blocks."""
    block_m = max(16, min(128, triton.next_power_of_2(group * triton.cdiv(num_tokens, batch))))
    # H100 sweep (bench_kernels.py --sweep, B 32/128, ctx 4K/16K, BLOCK_M 64): 4 warps and 3
    # stages halve the time of 8 warps / 2 stages (fewer registers: 2+ CTAs per SM).
    return block_m, 8 if block_m * triton.next_power_of_2(dv) > 64 * 128 else 4


def verify_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    sm_scale: float,
    logit_cap: float = 0.0,
    num_kv_splits: int | None = None,
    scores: torch.Tensor | None = None,
    score_lse: torch.Tensor | None = None,
    aggregation: str = "sum",
    block_n: int = _BLOCK_N,
    num_warps: int | None = None,
    num_stages: int = 3,
    max_ext: int | None = None,
    score_lse_rows: torch.Tensor | None = None,
    split_by_length: bool = False,
) -> torch.Tensor:
    """Causal verify attention (passes 1-2); writes ``out``, returns lse [T, Hq].

    With ``scores`` and ``score_lse`` it also dumps the scores in the same pass (see
    :func:`verify_attention_with_scores`). ``block_n``/``num_warps``/``num_stages`` override
    the launch shape (``scripts/bench_kernels.py --sweep`` measures them). ``max_ext`` (the
    longest chain) sizes the row blocks when ``q`` holds more than the verify rows (a unified
    pass); by default the mean tokens per request does.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    batch = prefix_lens.shape[0]
    num_kv_heads = k_buffer.shape[1]
    dv = v_buffer.shape[-1]
    assert num_q_heads % num_kv_heads == 0, "Hq must be a multiple of Hkv"
    assert k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1 and q.stride(-1) == 1
    assert req_to_token.stride(1) == 1 and out.stride(-1) == 1
    group = num_q_heads // num_kv_heads
    num_kv_splits, target_programs = pick_split_launch(num_kv_splits, split_by_length, batch, num_kv_heads,
                                                       q.device)
    block_m, default_warps = _blocks(batch * max_ext if max_ext else num_tokens, batch, group, dv)
    block_dv = triton.next_power_of_2(dv)
    lse = torch.empty((num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
    split = num_kv_splits > 1
    if split:
        part_out = torch.empty(
            (num_tokens, num_q_heads, num_kv_splits, dv), dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty((num_tokens, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device)
        fwd_out, fwd_lse, stride_os = part_out, part_lse, part_out.stride(2)
    else:
        fwd_out, fwd_lse, stride_os = out, lse, 0
    fused = score_lse is not None
    if fused:
        assert scores is not None and score_lse.shape[1] == num_q_heads
        assert score_lse_rows is not None or score_lse.shape[0] == batch
        assert score_lse.dtype == torch.float32 and score_lse.stride(2) == 1
    row_lse = score_lse if fused else lse  # placeholders when not fused (never read)
    score_buf = scores if fused else lse

    _verify_fwd[(batch, num_kv_heads, num_kv_splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, prefix_lens, extend_lens, qo_indptr,
        fwd_out, fwd_lse, row_lse, score_lse_rows if score_lse_rows is not None else prefix_lens,
        score_buf, sm_scale, num_kv_splits, target_programs, batch,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1), req_to_token.stride(0),
        fwd_out.stride(0), fwd_out.stride(1), stride_os, fwd_lse.stride(0), fwd_lse.stride(1),
        row_lse.stride(0), row_lse.stride(1), score_buf.stride(0), score_buf.stride(1),
        G=group, D=head_dim, DV=dv, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_B=triton.next_power_of_2(batch), BY_LENGTH=split_by_length,
        LOGIT_CAP=float(logit_cap), SPLIT=split,
        RING=score_lse.shape[2] if fused else 0, RING_BY_ROWS=score_lse_rows is not None,
        AGG_MAX=aggregation == "max",
        num_warps=num_warps or default_warps, num_stages=num_stages,
    )
    if split:
        _verify_reduce[(num_tokens, num_q_heads)](
            part_out, part_lse, out, lse, qo_indptr, batch, num_kv_splits,
            part_out.stride(0), part_out.stride(1), part_out.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1), lse.stride(0), lse.stride(1),
            DV=dv, BLOCK_DV=block_dv, num_warps=4,
        )
    return lse


def verify_attention_with_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    scores: torch.Tensor,
    sm_scale: float,
    aggregation: str = "sum",
    logit_cap: float = 0.0,
    num_kv_splits: int | None = None,
    score_lse: torch.Tensor | None = None,
    score_pass_warps: int = 4,
    score_pass_stages: int = 3,
    max_ext: int | None = None,
    score_lse_rows: torch.Tensor | None = None,
    split_by_length: bool = False,
    **launch: int,
) -> None:
    """Causal verify attention over the paged KV plus the per-position PillarAttn scores.

    Shapes: q [T, Hq, D] (request b owns rows qo_indptr[b]:qo_indptr[b] + extend_lens[b]);
    out [T, Hq, Dv] (written for those rows only: rows outside [qo_indptr[0], qo_indptr[B])
    are left alone, so a unified pass can keep draft rows in the same q/out); req_to_token
    [max_reqs, max_ctx] int32; req_pool_indices, prefix_lens, extend_lens [B] int32; qo_indptr [B+1] int32; scores [B, Hkv, >= max context] fp32, written
    for positions [0, prefix_lens[b] + extend_lens[b]) only (nothing for a request with no
    verify tokens). ``num_kv_splits`` (optional) gives every request that many equal KV
    splits (default: ``pick_num_kv_splits``, shape-only, no sync). ``split_by_length`` instead
    gives each request splits in proportion to its context, counted on the device from the
    batch's total (``pick_kv_split_grid``: shape-only grid, no sync), so one long request does
    not set the launch's time.

    ``score_lse`` selects the normaliser of each row's probabilities:

    * ``None`` (exact): the row's own lse, known only after pass 1, so pass 3 re-reads K;
    * ``[B, Hq, W]`` fp32 (draft-normalised, one pass): row i of request b is normalised by
      ``score_lse[b, hq, (prefix_b + min(i, n_ext_b - 2)) % W]``, which the caller filled with
      the lse of the draft step that had row i's token as its query (``sparse_decode_attention``
      writes it there with ``lse_ring``). That lse covers only the draft's sparse set, so it is
      at most the full one: row i's probabilities are scaled by 1 / (mass the draft's sparse
      attention captured), which up-weights rows the last selection served badly. No extra
      KV read: the scores come out of pass 1's QK^T tiles. With ``score_lse_rows [B]`` (int)
      the ring is read at row ``score_lse_rows[b]`` instead of ``b`` (keyed by pool row).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    num_tokens, num_q_heads, head_dim = q.shape
    batch = prefix_lens.shape[0]
    num_kv_heads = k_buffer.shape[1]
    assert scores.shape[:2] == (batch, num_kv_heads) and scores.dtype == torch.float32
    assert scores.stride(2) == 1
    if batch == 0 or num_tokens == 0:
        return
    layout = dict(req_to_token=req_to_token, req_pool_indices=req_pool_indices, prefix_lens=prefix_lens,
                  extend_lens=extend_lens, qo_indptr=qo_indptr)
    lse = verify_attention(q, k_buffer, v_buffer, out, **layout, sm_scale=sm_scale, logit_cap=logit_cap,
                           num_kv_splits=num_kv_splits, scores=scores, score_lse=score_lse,
                           aggregation=aggregation, max_ext=max_ext, score_lse_rows=score_lse_rows,
                           split_by_length=split_by_length, **launch)
    if score_lse is None:
        verify_scores(q, k_buffer, **layout, lse=lse, scores=scores, sm_scale=sm_scale,
                      aggregation=aggregation, logit_cap=logit_cap, num_kv_splits=num_kv_splits,
                      num_warps=score_pass_warps, num_stages=score_pass_stages, max_ext=max_ext,
                      split_by_length=split_by_length)


def verify_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    lse: torch.Tensor,
    scores: torch.Tensor,
    sm_scale: float,
    aggregation: str = "sum",
    logit_cap: float = 0.0,
    num_kv_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
    max_ext: int | None = None,
    split_by_length: bool = False,
) -> None:
    """Pass 3 alone: exact scores from the rows' final lse [T, Hq] (fp32, natural log), for a
    verify whose attention output came from elsewhere (the deterministic-inference path)."""
    num_tokens, num_q_heads, head_dim = q.shape
    batch = prefix_lens.shape[0]
    num_kv_heads = k_buffer.shape[1]
    if batch == 0 or num_tokens == 0:
        return
    num_kv_splits, target_programs = pick_split_launch(num_kv_splits, split_by_length, batch, num_kv_heads,
                                                       q.device)
    group = num_q_heads // num_kv_heads
    block_m, _ = _blocks(batch * max_ext if max_ext else num_tokens, batch, group, head_dim)
    _verify_scores[(batch, num_kv_heads, num_kv_splits)](
        q, k_buffer, req_to_token, req_pool_indices, prefix_lens, extend_lens, qo_indptr,
        lse, scores, sm_scale, num_kv_splits, target_programs, batch,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0),
        lse.stride(0), lse.stride(1), scores.stride(0), scores.stride(1),
        G=group, D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N, BLOCK_B=triton.next_power_of_2(batch), BY_LENGTH=split_by_length,
        LOGIT_CAP=float(logit_cap),
        AGG_MAX=aggregation == "max",
        num_warps=num_warps, num_stages=num_stages,
    )


def verify_attention_with_scores_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    qo_indptr: torch.Tensor,
    scores: torch.Tensor,
    sm_scale: float,
    aggregation: str = "sum",
    logit_cap: float = 0.0,
    score_lse: torch.Tensor | None = None,
) -> None:
    """PyTorch reference: explicit gather, causal softmax per request; writes out and scores."""
    num_q_heads = q.shape[1]
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    for b in range(prefix_lens.shape[0]):
        prefix, n_ext = int(prefix_lens[b]), int(extend_lens[b])
        total = prefix + n_ext
        if n_ext == 0:
            continue
        slots = req_to_token[int(req_pool_indices[b]), :total].long()
        rows = slice(int(qo_indptr[b]), int(qo_indptr[b]) + n_ext)
        k = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [total, Hq, D]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,phd->hip", q[rows].float(), k) * sm_scale  # [Hq, n_ext, total]
        if logit_cap > 0:
            s = logit_cap * torch.tanh(s / logit_cap)
        visible = torch.arange(total)[None, :] <= prefix + torch.arange(n_ext)[:, None]
        s = s.masked_fill(~visible.to(s.device), float("-inf"))
        prob = torch.softmax(s, dim=-1)
        out[rows] = torch.einsum("hip,phd->ihd", prob, v).to(out.dtype)
        if score_lse is not None:
            ring = score_lse.shape[2]
            lse_pos = prefix + torch.arange(n_ext).clamp(max=max(n_ext - 2, 0))
            row_lse = score_lse[b][:, lse_pos % ring].float()  # [Hq, n_ext]
            prob = torch.exp((s - row_lse[:, :, None]).clamp(max=60.0))
        per_group = prob.view(num_kv_heads, group * n_ext, total)
        agg = per_group.sum(1) if aggregation == "sum" else per_group.amax(1)
        scores[b, :, :total] = agg
