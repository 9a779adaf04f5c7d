"""PillarState: per-request selection rows keyed by req_pool_idx (CPU)."""

import pytest
import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState


def _state(**cfg):
    req_to_token = torch.arange(4 * 64, dtype=torch.int32).view(4, 64).flip(1).contiguous()
    config = SparseSpecConfig(**{"sparsity": 0.25, "min_selected": 2, "max_selected": 8, "num_sink_tokens": 2, **cfg})
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


def test_draft_step_gathers_the_state_in_batch_order_and_clears_the_rest():
    from sparsespec_sglang.forward_plan import DraftStep

    state, _ = _state()
    state.init_window(torch.tensor([2, 0]), torch.tensor([40, 12]))
    step = DraftStep.allocate(4, torch.device("cpu"))
    step.sel_lens.fill_(7)
    step.load(torch.tensor([0, 2]), state.dense_start, state.sel_lens)
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


def test_pending_token_follows_prefill_then_each_commit_by_pool_row():
    """The pending token (the next verify chain's first token) is kept per pool row: a prefill sets it,
    an accepted verify replaces it and moves the dense start; other rows keep theirs."""
    state, _ = _state()
    state.set_pending(torch.tensor([3, 1]), torch.tensor([1000, 2**40]))
    assert state.pending.tolist() == [0, 2**40, 0, 1000]
    state.init_window(torch.tensor([3, 1]), torch.tensor([20, 5]))
    state.commit(torch.tensor([1]), window_start=torch.tensor([7]), last_tokens=torch.tensor([55]))
    assert state.pending.tolist() == [0, 55, 0, 1000]
    assert state.dense_start.tolist() == [0, 7, 0, 20]
    assert state.pending.dtype == torch.int64  # token ids beyond int32 survive


@pytest.mark.parametrize("sparsity, lens, want", [
    (0.07, [100, 101, 29, 114], [7, 8, 3, 8]),  # 0.07 * 100 is 7.000000000000001 in float64
    (0.13, [8, 40, 54, 100], [2, 6, 8, 8]),  # floor, 5.2, 7.02, cap
    (1 / 3, [3, 6, 7, 21], [2, 2, 3, 7]),  # 333333 ppm: 3 -> ceil(0.999999) = 1, raised to the floor 2
    (0.03, [100, 101, 200], [3, 4, 6]),
])
def test_num_selected_at_non_power_of_two_sparsities(sparsity, lens, want):
    state, _ = _state(sparsity=sparsity)
    assert state.num_selected(torch.tensor(lens)).tolist() == want


def test_commit_starts_the_dense_tail_at_the_recent_part():
    """A hybrid / window selection leaves its most recent R candidates to the dense tail: the
    verify's top-K writes R per pool row and the commit starts the tail R positions early."""
    state, _ = _state()
    state.sel_recent[torch.tensor([1, 3])] = torch.tensor([0, 5], dtype=torch.int32)
    state.commit(torch.tensor([3, 1]), window_start=torch.tensor([40, 9]), last_tokens=torch.tensor([1, 2]))
    assert state.dense_start.tolist() == [0, 9, 0, 35]


def test_stopping_and_starting_speculation():
    """Dense decoding: no selection and a dense range from position 0 (the whole context, sinks
    included once); speculating again: the first-step window at the committed length, as after a
    prefill of that length. Other rows and the pending tokens are untouched."""
    state, r2t = _state()
    state.init_window(torch.tensor([1, 2]), torch.tensor([20, 30]))
    state.set_pending(torch.tensor([1, 2]), torch.tensor([7, 8]))
    state.stop_speculating(torch.tensor([1]))
    assert (int(state.dense_start[1]), int(state.sel_lens[1])) == (0, 0)
    assert (int(state.dense_start[2]), int(state.sel_lens[2])) == (30, 8)
    state.start_speculating(torch.tensor([1]), torch.tensor([36]))  # 16 tokens decoded densely
    assert (int(state.dense_start[1]), int(state.sel_lens[1])) == (36, 8)  # K = ceil(0.25 * 36) capped at 8
    assert torch.equal(state.sel_indices[:, 1, :, :8], r2t[1, 28:36].expand(3, 2, 8))
    assert state.pending[[1, 2]].tolist() == [7, 8]
