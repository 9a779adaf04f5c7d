"""Deterministic-inference verify: each verify token through SGLang's own decode kernel (CPU,
Triton interpreter). The GPU end-to-end check is scripts/check_lossless.py --deterministic."""

from __future__ import annotations

import math

import torch

from sparsespec_sglang.deterministic import verify_as_decode_rows
from sparsespec_sglang.kernels.verify_attention import verify_attention_with_scores_ref

HQ, HKV, D, TILE = 8, 2, 32, 16


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


def test_every_verify_row_is_bitwise_its_own_decode_step():
    req_to_token, k, v, gen = _pool()
    rows, seq_lens, width = torch.tensor([2, 0, 3], dtype=torch.int32), torch.tensor([40, 7, 70]), 5
    q = torch.randn(3 * width, HQ, D, generator=gen)
    out, lse = _run(q, k, v, req_to_token, rows, seq_lens, width)
    for b in range(3):
        for i in range(width):
            t = b * width + i
            # Plain decoding at that position: a batch of one, length seq_len + i + 1.
            alone, alone_lse = _run(q[t:t + 1], k, v, req_to_token, rows[b:b + 1],
                                    torch.tensor([int(seq_lens[b]) + i]), 1)
            assert torch.equal(out[t], alone[0]) and torch.equal(lse[t], alone_lse[0])


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
