"""PillarState: per-request selection rows keyed by req_pool_idx (CPU)."""

import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState


def _state(**cfg):
    req_to_token = torch.arange(4 * 64, dtype=torch.int32).view(4, 64).flip(1).contiguous()
    config = SparseSpecConfig(sparsity=0.25, min_selected=2, max_selected=8, num_sink_tokens=2, **cfg)
    return (PillarState(config, num_layers=3, num_q_heads=4, num_kv_heads=2, req_to_token=req_to_token),
            req_to_token)


def test_init_window_selects_most_recent_prompt_tokens():
    state, r2t = _state()
    rows = torch.tensor([3, 1])
    seq_lens = torch.tensor([20, 5])  # K = clamp(ceil(0.25 * L), 2, 8) -> 5, 2
    state.init_window(rows, seq_lens)
    assert state.sel_lens[3] == 5 and state.sel_lens[1] == 2
    assert state.dense_start[3] == 20 and state.dense_start[1] == 5
    assert torch.equal(state.sel_indices[:, 3, :, :5], r2t[3, 15:20].expand(3, 2, 5))
    assert torch.equal(state.sel_indices[:, 1, :, :2], r2t[1, 3:5].expand(3, 2, 2))
    assert state.sel_lens[0] == 0 and state.sel_lens[2] == 0  # other rows untouched


def test_window_never_reaches_into_the_sinks():
    state, r2t = _state()
    state.init_window(torch.tensor([0]), torch.tensor([3]))  # 1 candidate after 2 sinks
    assert state.sel_lens[0] == 1
    assert torch.equal(state.sel_indices[:, 0, :, 0], r2t[0, 2].expand(3, 2))


def test_load_draft_step_gathers_in_batch_order_and_clears_the_rest():
    state, _ = _state()
    state.init_window(torch.tensor([2, 0]), torch.tensor([40, 12]))
    state.draft_step.sel_lens.fill_(7)
    step = state.load_draft_step(torch.tensor([0, 2]))
    assert step.dense_start[:2].tolist() == [12, 40]
    assert step.sel_lens[:2].tolist() == [3, 8]
    assert step.sel_lens[2:].tolist() == [0, 0]


def test_num_selected_clamps_to_table_width():
    state, _ = _state()
    assert state.num_selected(torch.tensor([1, 8, 100])).tolist() == [2, 2, 8]


def test_draft_lse_ring_only_for_draft_normalised_scores():
    assert _state()[0].draft_lse is None
    state, _ = _state(num_draft_steps=3, score_norm="draft")
    assert state.draft_lse.shape == (3, 4, 4, 4)  # [L, R, Hq, k+1]


def test_pending_token_row_per_request():
    state, _ = _state()
    assert state.pending.shape == (4,) and state.pending.dtype == torch.int64
