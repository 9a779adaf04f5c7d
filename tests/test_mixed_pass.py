"""The backend's unified-pass layer (``SparseSpecAttnBackend._forward_mixed``) on the CPU.

The kernels run in the Triton interpreter; SGLang's backend constructor (which needs a model
runner) is skipped, the layer method runs on a pass of 3 drafting requests and 2 verifying
ones over 3 layers. Selecting the top-K of a group of layers in one launch must give exactly the
tables and outputs of selecting layer by layer, including when a pass verifies more requests
than the group buffer holds (the per-layer fallback).
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sparsespec_sglang.attention import SparseSpecAttnBackend  # noqa: E402
from sparsespec_sglang.config import SparseSpecConfig  # noqa: E402
from sparsespec_sglang.pillar import MixedRows, PillarState  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYERS, HQ, HKV, D, K = 3, 4, 2, 16, 3


def _ints(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _run_pass(keep_group: tuple[int, int] | None, score_norm: str):
    gen = torch.Generator().manual_seed(0)
    config = SparseSpecConfig(num_draft_steps=K, sparsity=0.2, min_selected=2, max_selected=16,
                              num_sink_tokens=2, score_norm=score_norm)
    num_rows, ctx = 8, 96
    req_to_token = (torch.randperm(num_rows * ctx, generator=gen) + 1).int().view(num_rows, ctx)
    state = PillarState(config, LAYERS, HQ, HKV, req_to_token.to(DEVICE))
    if keep_group is not None:
        state.keep_group_scores(*keep_group)
    if state.draft_lse is not None:
        state.draft_lse.copy_(torch.rand(state.draft_lse.shape, generator=gen) + 3.0)
    num_slots = num_rows * ctx + 1
    k_buf = [torch.randn(num_slots, HKV, D, generator=gen).to(DEVICE) for _ in range(LAYERS)]
    v_buf = [torch.randn(num_slots, HKV, D, generator=gen).to(DEVICE) for _ in range(LAYERS)]

    # Drafting requests at pool rows 1, 4, 6 (one row each); verifying ones at rows 2 and 5 with
    # chains of 3 and 4 tokens after prefixes of 50 and 70.
    draft_pool, draft_len = [1, 4, 6], [40, 61, 33]
    verify_pool, prefix, lens = [2, 5], [50, 70], [3, 4]
    row_pool = draft_pool + [2] * 3 + [5] * 4
    seq_lens = draft_len + [51, 52, 53] + [71, 72, 73, 74]
    t = len(row_pool)
    rows = MixedRows.allocate(K + 1, 32, DEVICE)
    rows.dense_start[:t] = _ints([n - 2 for n in draft_len] + seq_lens[3:])
    rows.sel_lens[:t] = 0
    rows.ring_rows[:t] = _ints(draft_pool + [0] * 7)
    rows.verify_rows[:2], rows.verify_prefix[:2] = _ints(verify_pool), _ints(prefix)
    rows.verify_lens[:2], rows.verify_end[:2] = _ints(lens), _ints([p + n for p, n in zip(prefix, lens)])
    rows.qo_indptr[:3] = _ints([3, 6, 10])
    rows.num_verify = 2

    backend = object.__new__(SparseSpecAttnBackend)
    backend.state, backend._mixed, backend._num_sms = state, rows, 4
    backend.token_to_kv_pool = SimpleNamespace(head_num=HKV, get_key_buffer=lambda i: k_buf[i],
                                               get_value_buffer=lambda i: v_buf[i])
    forward_batch = SimpleNamespace(req_pool_indices=_ints(row_pool), seq_lens=_ints(seq_lens))
    outs = []
    for lid in range(LAYERS):
        q = torch.randn(t, HQ * D, generator=gen).to(DEVICE)
        layer = SimpleNamespace(layer_id=lid, tp_q_head_num=HQ, qk_head_dim=D, v_head_dim=D,
                                scaling=1.0 / math.sqrt(D), logit_capping_method="tanh", logit_cap=0.0)
        outs.append(backend._forward_mixed(q, layer, forward_batch))
    return torch.stack(outs), state


def test_grouped_topk_equals_per_layer_selection():
    for score_norm in ("exact", "draft"):
        out, state = _run_pass(None, score_norm)
        assert torch.all(state.sel_lens[[2, 5]] > 0)
        picked = [state.sel_indices[:, r, :, :int(state.sel_lens[r])] for r in (2, 5)]
        assert not torch.equal(picked[0][0], picked[0][1])  # layers select differently
        # groups {0, 1} and {2}, and a buffer too small for this pass's 2 verifies (fallback)
        for keep in ((2, 4), (LAYERS, 2), (2, 1)):
            out_g, state_g = _run_pass(keep, score_norm)
            torch.testing.assert_close(out_g, out, rtol=0, atol=0)
            assert torch.equal(state_g.sel_lens, state.sel_lens), keep
            assert torch.equal(state_g.sel_indices, state.sel_indices), keep
            assert bool(state_g.group_scores.any()) == (keep[1] >= 2)
