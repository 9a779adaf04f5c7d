"""Sparse paged decode attention for PillarAttn draft steps.

Why this kernel exists: a SparseSpec draft step runs the full model but attends, per request and
KV head, only to a small index set (~5% of the context) instead of the whole KV cache. SGLang's
Triton decode kernel walks one flat ``kv_indices`` list per request that every KV head shares, so it
cannot express a different index set per KV head, and building a per-step index list on the host
would cost a sync and an allocation per layer. This kernel reads the attended set straight from
three sources, so nothing is materialised per step:

* sink tokens   ``req_to_token[r, p]`` for ``p in [0, min(num_sink, dense_start[b]))``,
* selected slots ``sel_indices[b, h, :sel_lens[b]]`` (slot ids chosen by ``select_topk`` at the
  last verify, one list per KV head),
* dense tokens  ``req_to_token[r, p]`` for ``p in [dense_start[b], seq_lens[b])`` (everything
  written since the last verify, including the current draft token).

It is flash-decoding (split-K): the concatenated attended list of each (request, KV head) is cut
into ``num_kv_splits`` chunks, or (``split_by_length``) into chunks of about the same size across
the batch, so a request attending to more tokens (a longer context, or a dense row of a unified
pass) gets more of them; one program handles one chunk for all ``G = Hq // Hkv`` query heads
of the GQA group, so each K/V row is read from HBM once per group (as SGLang's grouped decode
kernel does). Partial results go to ``attn_logits``/``attn_lse`` and a second kernel merges them
with their log-sum-exps. With a preallocated workspace the call allocates nothing, never syncs
with the host and has a fixed launch grid, so it can be captured in a CUDA graph.

Cost per request, layer and KV head, with A = sinks + selected + dense attended tokens, head
dims D/Dv and KV element size e bytes: one read of A K rows and A V rows, ``A * (D + Dv) * e``
bytes, shared by all G query heads (plus A int32 slot ids: the selected list and the
req_to_token entries of sinks and dense tail). With S > 1 splits the partials add
``G * S * (Dv + 1) * 4`` bytes written and read back by the reduce, negligible next to the KV.
So a draft step reads about A / context of a dense decode's KV bytes (K = 5% of a 4K context:
~5.3%); ``scripts/bench_kernels.py`` measures the achieved fraction.

KV layout: SGLang ``MHATokenToKVPool`` buffers ``[num_slots, Hkv, D]``; kernels index per token,
so any page size works (a slot id is ``page * page_size + offset``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import kv_split_range, merge_splits, pick_num_kv_splits, pick_split_launch, tanh

__all__ = ["pick_num_kv_splits", "sparse_decode_attention", "sparse_decode_attention_ref"]

# Token-block of the attended list processed per loop iteration; a split is a multiple of it.
_BLOCK_N = 32


@triton.jit
def _sparse_decode_stage1(
    Q,
    K_Buffer,
    V_Buffer,
    Req_To_Token,
    Req_Pool_Indices,
    Seq_Lens,
    Dense_Start,
    Sel_Indices,
    Sel_Lens,
    Att_Out,
    Att_Lse,
    O,
    Lse_Ring,
    Ring_Rows,
    Skip_Indptr,
    sm_scale,
    num_sink,
    num_kv_splits,
    target_programs,
    batch,
    skip_last,
    stride_qb,
    stride_qh,
    stride_kbs,
    stride_kh,
    stride_vbs,
    stride_vh,
    stride_r2t,
    stride_sel_b,
    stride_sel_h,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_o_b,
    stride_o_h,
    stride_rb,
    stride_rh,
    G: tl.constexpr,
    BLOCK_H: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BY_LENGTH: tl.constexpr,
    LOGIT_CAP: tl.constexpr,
    FINAL: tl.constexpr,
    RING: tl.constexpr,
    RING_BY_ROWS: tl.constexpr,
    SKIP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    split = tl.program_id(2)
    if SKIP:
        # Rows [Skip_Indptr[0], Skip_Indptr[skip_last]) belong to another kernel (unified pass).
        if (b >= tl.load(Skip_Indptr)) & (b < tl.load(Skip_Indptr + skip_last)):
            return

    r = tl.load(Req_Pool_Indices + b).to(tl.int64)
    seq_len = tl.load(Seq_Lens + b)
    dense_start = tl.load(Dense_Start + b)
    n_sel = tl.load(Sel_Lens + b)
    n_sink = tl.minimum(num_sink, dense_start)
    n_dense = tl.maximum(seq_len - dense_start, 0)
    sel_end = n_sink + n_sel
    total = sel_end + n_dense

    if BY_LENGTH:
        # The batch's attended tokens (its skipped rows left out), for splits in proportion to them.
        offs_b = tl.arange(0, BLOCK_B)
        in_batch = offs_b < batch
        if SKIP:
            in_batch = in_batch & ((offs_b < tl.load(Skip_Indptr)) | (offs_b >= tl.load(Skip_Indptr + skip_last)))
        all_start = tl.load(Dense_Start + offs_b, mask=in_batch, other=0)
        all_work = (tl.minimum(num_sink, all_start) + tl.load(Sel_Lens + offs_b, mask=in_batch, other=0)
                    + tl.maximum(tl.load(Seq_Lens + offs_b, mask=in_batch, other=0) - all_start, 0))
        batch_work = tl.sum(tl.where(in_batch, all_work, 0), 0)
    else:
        batch_work = 0
    start, end = kv_split_range(total, batch_work, split, num_kv_splits, target_programs,
                                tl.num_programs(1), BLOCK_N, BY_LENGTH)

    offs_h = tl.arange(0, BLOCK_H)
    heads = h * G + offs_h
    mask_h = offs_h < G
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_d = offs_d < D
    mask_dv = offs_dv < DV

    e_max = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
    e_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

    if end > start:
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_h[:, None] & mask_d[None, :],
            other=0.0,
        ).to(K_Buffer.dtype.element_ty)
        r2t_row = Req_To_Token + r * stride_r2t
        sel_row = Sel_Indices + r * stride_sel_b + h * stride_sel_h  # the pool row's selection
        for n0 in range(start, end, BLOCK_N):
            j = n0 + tl.arange(0, BLOCK_N)
            valid = j < end
            is_tok = (j < n_sink) | (j >= sel_end)
            pos = tl.where(j < n_sink, j, dense_start + (j - sel_end))
            tok_slot = tl.load(r2t_row + pos, mask=valid & is_tok, other=0)
            sel_slot = tl.load(sel_row + (j - n_sink), mask=valid & (~is_tok), other=0)
            slot = tl.where(is_tok, tok_slot, sel_slot).to(tl.int64)

            k = tl.load(
                K_Buffer + slot[None, :] * stride_kbs + h * stride_kh + offs_d[:, None],
                mask=valid[None, :] & mask_d[:, None],
                other=0.0,
            )
            qk = tl.dot(q, k) * sm_scale
            if LOGIT_CAP > 0:
                qk = LOGIT_CAP * tanh(qk / LOGIT_CAP)
            # Only columns are masked: padded head rows have q = 0, so they stay finite.
            qk = tl.where(valid[None, :], qk, float("-inf"))

            v = tl.load(
                V_Buffer + slot[:, None] * stride_vbs + h * stride_vh + offs_dv[None, :],
                mask=valid[:, None] & mask_dv[None, :],
                other=0.0,
            )
            n_e_max = tl.maximum(tl.max(qk, 1), e_max)
            re_scale = tl.exp(e_max - n_e_max)
            p = tl.exp(qk - n_e_max[:, None])
            acc = acc * re_scale[:, None] + tl.dot(p.to(v.dtype), v)
            e_sum = e_sum * re_scale + tl.sum(p, 1)
            e_max = n_e_max
        acc = acc / e_sum[:, None]
        lse = e_max + tl.log(e_sum)
    else:
        # Empty chunk: the reduce kernel skips a split whose lse is -inf.
        lse = e_max

    if FINAL:
        # One split: this is the row's result; write it where the reduce would have.
        tl.store(
            O + b * stride_o_b + heads[:, None] * stride_o_h + offs_dv[None, :],
            acc.to(O.dtype.element_ty),
            mask=mask_h[:, None] & mask_dv[None, :],
        )
        if RING > 0:
            pos = tl.maximum(seq_len - 1, 0)
            ring_b = tl.load(Ring_Rows + b).to(tl.int64) if RING_BY_ROWS else b
            tl.store(Lse_Ring + ring_b * stride_rb + heads * stride_rh + pos % RING, lse, mask=mask_h)
    elif end > start:  # an empty split's partial is never read (its lse is -inf)
        tl.store(
            Att_Out + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_dv[None, :],
            acc,
            mask=mask_h[:, None] & mask_dv[None, :],
        )
    tl.store(Att_Lse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _sparse_decode_reduce(
    Att_Out,
    Att_Lse,
    O,
    Seq_Lens,
    Lse_Ring,
    Ring_Rows,
    Skip_Indptr,
    num_kv_splits,
    skip_last,
    stride_ab,
    stride_ah,
    stride_as,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    stride_rb,
    stride_rh,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    RING: tl.constexpr,
    RING_BY_ROWS: tl.constexpr,
    SKIP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    hq = tl.program_id(1)
    if SKIP:
        if (b >= tl.load(Skip_Indptr)) & (b < tl.load(Skip_Indptr + skip_last)):
            return
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < DV

    lse_row = Att_Lse + b * stride_lb + hq * stride_lh
    out, lse = merge_splits(Att_Out + b * stride_ab + hq * stride_ah, lse_row, stride_as, num_kv_splits,
                            offs_dv, mask_dv, BLOCK_DV)
    tl.store(O + b * stride_ob + hq * stride_oh + offs_dv, out.to(O.dtype.element_ty), mask=mask_dv)
    # The merged lse lands in split slot 0 (all of this row's splits were read above).
    tl.store(lse_row, lse)
    if RING > 0:
        # Keyed by the query's position, so the verify finds it by position (no step counter).
        # (A CUDA-graph padding row may carry seq_len 0: clamp so it never writes before the row.)
        pos = tl.maximum(tl.load(Seq_Lens + b) - 1, 0)
        ring_b = tl.load(Ring_Rows + b).to(tl.int64) if RING_BY_ROWS else b
        tl.store(Lse_Ring + ring_b * stride_rb + hq * stride_rh + pos % RING, lse)


def sparse_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    sel_indices: torch.Tensor,
    sel_lens: torch.Tensor,
    num_sink: int,
    sm_scale: float,
    logit_cap: float = 0.0,
    num_kv_splits: int | None = None,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    lse_ring: torch.Tensor | None = None,
    block_n: int = _BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
    ring_rows: torch.Tensor | None = None,
    skip_rows: tuple[torch.Tensor, int] | None = None,
    split_by_length: bool = False,
) -> torch.Tensor:
    """Attention of one decode token per request over sink + selected + dense KV slots.

    Shapes: q [B, Hq, D]; out [B, Hq, Dv] (written); k_buffer [slots, Hkv, D]; v_buffer
    [slots, Hkv, Dv]; req_to_token [max_reqs, max_ctx] int32; req_pool_indices, seq_lens,
    dense_start, sel_lens [B] int32; sel_indices [rows, Hkv, max_sel] int32 slot ids, the whole
    pool's table, read at row ``req_pool_indices[b]`` (no per-step gather of the batch's rows).
    ``num_kv_splits``: that many equal KV splits for every row (None: ``pick_num_kv_splits``).
    ``split_by_length``: instead, splits in proportion to each row's attended tokens, counted on
    the device from the batch (``pick_kv_split_grid`` bounds them).
    ``workspace = (attn_logits [>=B, Hq, >=splits, Dv] fp32, attn_lse [>=B, Hq, same] fp32)``.

    Returns the log-sum-exp [B, Hq] fp32 of each row. It is a view of ``attn_lse[:B, :, 0]``
    (no allocation), valid until the workspace is reused. ``lse_ring [>=B, Hq, W]`` fp32, if
    given, also receives it at ``[b, :, (seq_lens[b] - 1) % W]`` (the query's position), where
    the draft-normalised verify score dump reads it; with ``ring_rows [B]`` (int) at
    ``[ring_rows[b], :, ...]`` instead (a unified pass keys the ring by pool row).
    ``skip_rows = (indptr, n)`` (int32 on the device) leaves rows ``indptr[0] <= b < indptr[n]``
    untouched (out, lse and ring): a unified pass's verify rows, which the verify kernel writes
    concurrently on another stream.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    dv = v_buffer.shape[-1]
    assert num_q_heads % num_kv_heads == 0, "Hq must be a multiple of Hkv"
    assert sel_indices.shape[1] == num_kv_heads
    assert k_buffer.stride(-1) == 1 and v_buffer.stride(-1) == 1 and q.stride(-1) == 1
    assert req_to_token.stride(1) == 1 and sel_indices.stride(2) == 1 and out.stride(-1) == 1
    group = num_q_heads // num_kv_heads
    num_kv_splits, target_programs = pick_split_launch(num_kv_splits, split_by_length, batch, num_kv_heads,
                                                       q.device)

    if workspace is None:
        attn_logits = torch.empty(
            (batch, num_q_heads, num_kv_splits, dv), dtype=torch.float32, device=q.device
        )
        attn_lse = torch.empty((batch, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device)
    else:
        attn_logits, attn_lse = workspace
        assert attn_logits.shape[2] >= num_kv_splits and attn_lse.shape[2] >= num_kv_splits
        assert attn_logits.shape[0] >= batch and attn_lse.shape[0] >= batch
        assert attn_logits.stride(-1) == 1 and attn_lse.stride(-1) == 1

    if lse_ring is not None:
        assert (ring_rows is not None or lse_ring.shape[0] >= batch) and lse_ring.shape[1] == num_q_heads
        assert lse_ring.dtype == torch.float32 and lse_ring.stride(2) == 1
    ring = lse_ring if lse_ring is not None else attn_lse  # placeholder, never written
    ring_row_ids = ring_rows if ring_rows is not None else seq_lens  # placeholder when unused
    ring_width = lse_ring.shape[2] if lse_ring is not None else 0
    skip_indptr, skip_last = skip_rows if skip_rows is not None else (seq_lens, 0)
    # One split (a batch of >= ~2 SMs' worth of rows x KV heads): stage 1 writes the output and
    # the lse ring itself and the reduce launch is skipped.
    final = num_kv_splits == 1
    block_h = max(16, triton.next_power_of_2(group))
    _sparse_decode_stage1[(batch, num_kv_heads, num_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        dense_start,
        sel_indices,
        sel_lens,
        attn_logits,
        attn_lse,
        out,
        ring,
        ring_row_ids,
        skip_indptr,
        sm_scale,
        num_sink,
        num_kv_splits,
        target_programs,
        batch,
        skip_last,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        sel_indices.stride(0),
        sel_indices.stride(1),
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
        out.stride(0),
        out.stride(1),
        ring.stride(0),
        ring.stride(1),
        G=group,
        BLOCK_H=block_h,
        D=head_dim,
        DV=dv,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_DV=triton.next_power_of_2(dv),
        BLOCK_N=block_n,
        BLOCK_B=triton.next_power_of_2(batch),
        BY_LENGTH=split_by_length,
        LOGIT_CAP=float(logit_cap),
        FINAL=final,
        RING=ring_width,
        RING_BY_ROWS=ring_rows is not None,
        SKIP=skip_rows is not None,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if final:
        return attn_lse[:batch, :, 0]
    _sparse_decode_reduce[(batch, num_q_heads)](
        attn_logits,
        attn_lse,
        out,
        seq_lens,
        ring,
        ring_row_ids,
        skip_indptr,
        num_kv_splits,
        skip_last,
        attn_logits.stride(0),
        attn_logits.stride(1),
        attn_logits.stride(2),
        attn_lse.stride(0),
        attn_lse.stride(1),
        out.stride(0),
        out.stride(1),
        ring.stride(0),
        ring.stride(1),
        DV=dv,
        BLOCK_DV=triton.next_power_of_2(dv),
        RING=ring_width,
        RING_BY_ROWS=ring_rows is not None,
        SKIP=skip_rows is not None,
        num_warps=4,
    )
    return attn_lse[:batch, :, 0]


def attended_slots_ref(
    *,
    req_to_token: torch.Tensor,
    req_pool_index: int,
    seq_len: int,
    dense_start: int,
    sel_slots: torch.Tensor,
    num_sink: int,
) -> torch.Tensor:
    """Slot ids one (request, KV head) attends to: sinks, then selected, then dense tokens."""
    row = req_to_token[req_pool_index].long()
    n_sink = min(num_sink, dense_start)
    return torch.cat([row[:n_sink], sel_slots.long(), row[dense_start:seq_len]])


def sparse_decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    *,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    dense_start: torch.Tensor,
    sel_indices: torch.Tensor,
    sel_lens: torch.Tensor,
    num_sink: int,
    sm_scale: float,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """PyTorch reference: gathers each attended set explicitly; writes ``out``, returns lse [B, Hq]."""
    batch, num_q_heads, _ = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    lse = torch.full((batch, num_q_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n_sel = int(sel_lens[b])
        for h in range(num_kv_heads):
            slots = attended_slots_ref(
                req_to_token=req_to_token, req_pool_index=int(req_pool_indices[b]),
                seq_len=int(seq_lens[b]), dense_start=int(dense_start[b]),
                sel_slots=sel_indices[b, h, :n_sel], num_sink=num_sink,
            )
            heads = slice(h * group, (h + 1) * group)
            if slots.numel() == 0:
                out[b, heads] = 0
                continue
            k = k_buffer[slots, h].float()
            v = v_buffer[slots, h].float()
            s = q[b, heads].float() @ k.T * sm_scale
            if logit_cap > 0:
                s = logit_cap * torch.tanh(s / logit_cap)
            lse[b, heads] = torch.logsumexp(s, dim=-1)
            out[b, heads] = (torch.softmax(s, dim=-1) @ v).to(out.dtype)
    return lse
