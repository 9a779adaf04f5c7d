"""Verify attention as one SGLang deterministic decode per verify token.

Why: greedy SPARSESPEC output must equal plain SGLang decoding token for token. In bf16 that
holds only if every verified token's logits are computed bitwise as plain decoding computes
them. With ``--enable-deterministic-inference`` SGLang makes plain decoding batch-invariant
(batch-invariant GEMMs, and a Triton decode kernel whose KV splits have a fixed tile size), so
the remaining difference is the verify's attention: a multi-token kernel reduces in another
order than the decode kernel. Here verify token i of request b runs through SGLang's own
``decode_attention_fwd`` as a decode of length ``seq_len_b + i + 1`` over the same slots with
the same split tile, which is exactly the decode step plain SGLang runs at that position.
It builds a kv_indices list per verify token, so it is a correctness mode, not a fast one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sparsespec_sglang.compat import create_flashinfer_kv_indices_triton


def verify_as_decode_rows(
    decode_attention_fwd: Callable[..., Any],
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    out: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    width: int,
    split_tile_size: int,
    max_kv_splits: int,
    sm_scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    **decode_kwargs: Any,
) -> torch.Tensor:
    """Attention of ``width`` verify tokens per request, each as its own decode.

    q [B * width, Hq, D] (request-major, as TARGET_VERIFY lays it out); out [B * width, Hq, Dv]
    (written); seq_lens [B]: tokens before each request's verify window. The verify tokens' KV
    must already be in the pool. Returns the rows' lse [B * width, Hq] (fp32, natural log).
    No host sync, so it can be captured in a CUDA graph.
    """
    rows, num_q_heads, _ = q.shape
    dv = v_buffer.shape[-1]
    device = q.device
    row_lens = (seq_lens.unsqueeze(1).to(torch.int32)
                + torch.arange(1, width + 1, device=device, dtype=torch.int32)).flatten()
    kv_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
    kv_indptr[1:] = torch.cumsum(row_lens, dim=0)
    kv_indices = torch.empty(rows * req_to_token.shape[1], dtype=torch.int64, device=device)
    create_flashinfer_kv_indices_triton[(rows,)](
        req_to_token, req_pool_indices.repeat_interleave(width), row_lens, kv_indptr, None,
        kv_indices, req_to_token.stride(0),
    )
    # SGLang's deterministic split count for a decode of this length.
    num_kv_splits = (row_lens + split_tile_size - 1) // split_tile_size
    attn_logits = torch.empty((rows, num_q_heads, max_kv_splits, dv), dtype=torch.float32, device=device)
    attn_lse = torch.full((rows, num_q_heads, max_kv_splits), float("-inf"), dtype=torch.float32,
                          device=device)
    decode_attention_fwd(q, k_buffer, v_buffer, out, kv_indptr, kv_indices, attn_logits, attn_lse,
                         num_kv_splits, max_kv_splits, sm_scale, k_scale, v_scale, **decode_kwargs)
    # Splits a row does not use keep lse -inf and drop out of the logsumexp.
    return torch.logsumexp(attn_lse, dim=-1)
