"""Deterministic-inference verify: each verify token through SGLang's own decode kernel (CPU,
Triton interpreter). The GPU end-to-end check is scripts/check_lossless.py --deterministic."""

from __future__ import annotations

import math

import torch

from sparsespec_sglang.deterministic import verify_as_decode_rows
from sparsespec_sglang.kernels.verify_attention import verify_attention_with_scores_ref

# TILE is a multiple of the decode kernel's 32-token block, so the split count sets the chunking.
HQ, HKV, D, TILE = 8, 2, 32, 64


def _pool(seed=0, rows=4, ctx=96):
    gen = torch.Generator().manual_seed(seed)
    slots = rows * ctx + 1
    req_to_token = (torch.randperm(slots - 1, generator=gen) + 1).int().view(rows, ctx)
    k = torch.randn(slots, HKV, D, generator=gen)
    v = torch.randn(slots, HKV, D, generator=gen)
    return req_to_token, k, v, gen


def _decode_fwd():
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    return decode_attention_fwd


def _run(q, k, v, req_to_token, rows, seq_lens, width, max_kv_splits=8):
    out = torch.empty_like(q)
    lse = verify_as_decode_rows(_decode_fwd(), q, k, v, out, req_to_token, rows, seq_lens, width, TILE,
                                max_kv_splits, D ** -0.5)
    return out, lse


def _plain_decode_step(q_row, k, v, req_to_token, row, length, max_kv_splits=8):
    """One plain SGLang decode step of a batch of one, set up as TritonAttnBackend does it under
    --enable-deterministic-inference: kv_indices straight from req_to_token, the split count
    from the backend's own get_num_kv_splits (fixed tile), then decode_attention_fwd."""
    from types import SimpleNamespace

    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    backend = SimpleNamespace(static_kv_splits=False, device_core_count=1, enable_deterministic=True,
                              split_tile_size=TILE, max_kv_splits=max_kv_splits)
    num_kv_splits = torch.empty(1, dtype=torch.int32)
    TritonAttnBackend.get_num_kv_splits(backend, num_kv_splits, torch.tensor([length], dtype=torch.int32))
    kv_indptr = torch.tensor([0, length], dtype=torch.int32)
    kv_indices = req_to_token[row, :length].long()
    out = torch.empty(1, HQ, D)
    attn_logits = torch.empty(1, HQ, max_kv_splits, D)
    attn_lse = torch.full((1, HQ, max_kv_splits), float("-inf"))
    _decode_fwd()(q_row.unsqueeze(0), k, v, out, kv_indptr, kv_indices, attn_logits, attn_lse,
                  num_kv_splits, max_kv_splits, D ** -0.5, 1.0, 1.0)
    return out[0], int(num_kv_splits[0])


def test_every_verify_row_is_bitwise_the_plain_decode_step():
    """Verify token i of request b equals, bit for bit, SGLang's own decode step at length
    seq_len + i + 1 (set up independently of verify_as_decode_rows)."""
    req_to_token, k, v, gen = _pool(ctx=160)
    # Lengths 61..65, 8..12 and 129..133: across the split-tile boundaries at 64 and 128.
    rows, seq_lens, width = torch.tensor([2, 0, 3], dtype=torch.int32), torch.tensor([60, 7, 128]), 5
    q = torch.randn(3 * width, HQ, D, generator=gen)
    out, _ = _run(q, k, v, req_to_token, rows, seq_lens, width)
    splits_seen = set()
    for b in range(3):
        for i in range(width):
            t = b * width + i
            plain, splits = _plain_decode_step(q[t], k, v, req_to_token, int(rows[b]), int(seq_lens[b]) + i + 1)
            splits_seen.add(splits)
            assert torch.equal(out[t], plain), (b, i)
    assert splits_seen == {1, 2, 3}


def test_matches_causal_verify_attention_and_its_lse():
    req_to_token, k, v, gen = _pool(seed=1)
    rows, seq_lens, width = torch.tensor([1, 3], dtype=torch.int32), torch.tensor([50, 17]), 4
    q = torch.randn(2 * width, HQ, D, generator=gen)
    out, lse = _run(q, k, v, req_to_token, rows, seq_lens, width)
    ref = torch.empty_like(q)
    scores = torch.zeros(2, HKV, 96)
    qo = torch.arange(0, 3, dtype=torch.int32) * width
    verify_attention_with_scores_ref(q, k, v, ref, req_to_token=req_to_token, req_pool_indices=rows,
                                     prefix_lens=seq_lens.int(), extend_lens=torch.full((2,), width, dtype=torch.int32),
                                     qo_indptr=qo, scores=scores, sm_scale=D ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # The lse is each row's log-sum-exp over its causal context (what the exact scores need).
    for b in range(2):
        for i in range(width):
            slots = req_to_token[rows[b], : int(seq_lens[b]) + i + 1].long()
            s = torch.einsum("hd,nhd->hn", q[b * width + i], k[slots].repeat_interleave(HQ // HKV, 1))
            torch.testing.assert_close(lse[b * width + i], torch.logsumexp(s * D ** -0.5, -1),
                                       atol=1e-5, rtol=1e-5)
    assert math.isfinite(float(lse.max()))
