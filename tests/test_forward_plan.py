"""MixedRows.fill (sparsespec_sglang/forward_plan.py): a pass's rows in the static buffers a CUDA
graph replays, every entry past the pass empty."""

from __future__ import annotations

import random

import torch

from sparsespec_sglang.forward_plan import MixedRows

WIDTH, MAX_ROWS = 4, 64


def _random_pass(rng: random.Random) -> dict:
    """A pass of ``t`` rows, the last ones the chains of ``nv`` verifying requests."""
    lens = [rng.randint(1, WIDTH) for _ in range(rng.randint(0, 6))]
    num_draft = rng.randint(0, MAX_ROWS - sum(lens))
    t = num_draft + sum(lens)
    qo = [num_draft]
    for n in lens:
        qo.append(qo[-1] + n)
    ints = lambda n, hi: torch.tensor([rng.randint(1, hi) for _ in range(n)], dtype=torch.int32)  # noqa: E731
    prefix = ints(len(lens), 500)
    return dict(pool=ints(t, 30), seq_lens=ints(t, 600), dense_start=ints(num_draft, 600),
                sel_lens=ints(num_draft, 64), qo_indptr=torch.tensor(qo, dtype=torch.int32),
                verify_pool=ints(len(lens), 30), verify_prefix=prefix,
                verify_lens=torch.tensor(lens, dtype=torch.int32), num_draft=num_draft,
                num_drafting=rng.randint(0, num_draft))


def test_each_kind_of_row_gets_its_attention_plan():
    """Drafting rows: their request's selection and dense tail, their pool row for the draft
    lse; dense rows: the same plan values (their state says full attention) and no lse; verify
    rows: sinks only from their own length (the verify kernel writes their output)."""
    rows = MixedRows.allocate(WIDTH, MAX_ROWS, torch.device("cpu"))
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32)  # noqa: E731
    rows.fill(pool=i32(3, 5, 7, 9, 9, 9), seq_lens=i32(40, 50, 60, 71, 72, 73), dense_start=i32(30, 0, 45),
              sel_lens=i32(8, 0, 9), qo_indptr=i32(3, 6), verify_pool=i32(9), verify_prefix=i32(70),
              verify_lens=i32(3), num_draft=3, num_drafting=2)
    assert rows.dense_start[:7].tolist() == [30, 0, 45, 71, 72, 73, 0]
    assert rows.sel_lens[:7].tolist() == [8, 0, 9, 0, 0, 0, 0]
    assert rows.ring_rows[:7].tolist() == [3, 5, 0, 0, 0, 0, 0]
    assert rows.verify_rows[:2].tolist() == [9, 0] and rows.verify_end[:2].tolist() == [73, 0]
    assert rows.qo_indptr[:4].tolist() == [3, 6, 6, 6] and rows.num_verify == 1


def _buffers(rows: MixedRows) -> list[torch.Tensor]:
    return [rows.dense_start, rows.sel_lens, rows.ring_rows, rows.verify_rows, rows.verify_prefix,
            rows.verify_lens, rows.verify_end, rows.qo_indptr]


def test_a_reused_buffer_holds_exactly_what_a_fresh_one_would():
    """Passes of every size one after the other in one set of buffers (as a server's passes
    are): after each fill, every buffer equals a fresh allocation filled with that pass alone, so
    the entries a larger earlier pass wrote read as empty."""
    rng = random.Random(0)
    reused = MixedRows.allocate(WIDTH, MAX_ROWS, torch.device("cpu"))
    for _ in range(60):
        one = _random_pass(rng)
        reused.fill(**one)
        fresh = MixedRows.allocate(WIDTH, MAX_ROWS, torch.device("cpu"))
        fresh.fill(**one)
        assert reused.num_verify == fresh.num_verify == one["qo_indptr"].shape[0] - 1
        for got, want in zip(_buffers(reused), _buffers(fresh)):
            assert torch.equal(got, want)
        t, nv = one["pool"].shape[0], reused.num_verify
        assert not reused.sel_lens[t:].any() and not reused.verify_lens[nv:].any()
        assert (reused.qo_indptr[nv + 1:] == t).all()
