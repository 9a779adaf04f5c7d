"""What one forward is: the plan a schedule puts on the batch, and the backend reads there.

SGLang tells its attention backends what a forward is through the forward batch: the forward mode,
and ``forward_batch.spec_info`` (EAGLE's draft and verify inputs, NGRAM's verify input) that the
backend reads in ``init_forward_metadata`` and ``forward_decode``. SPARSESPEC does the same. A
PillarAttn DECODE forward carries a :class:`ForwardPlan` as its ``spec_info``: which path it takes
and that path's per-row inputs:

- ``SPARSE_DRAFT`` (lockstep draft steps): every row is one request's draft step, the sparse
  decode over sinks + selection + dense tail, with the batch-ordered inputs of a :class:`DraftStep`;
- ``UNIFIED_PASS`` (unified schedule): draft rows, dense rows and verify chains in one forward,
  described by :class:`MixedRows`.

A forward without a plan is SGLang's: prefill and plain decode (also a unified pass whose rows are
all dense) take SGLang's Triton paths, and a
TARGET_VERIFY forward (which SGLang marks itself, with its ``NgramVerifyInput``) is the PillarAttn
verify. The plan's buffers are static, so a CUDA graph captured with a plan (the graph runner hands
it to SGLang's capture as the batch's ``spec_info``, ``forward_graphs.py``) replays with whatever
the buffers hold at replay time.

A plan is an SGLang ``SpecInput`` that is neither a draft nor a verify input of SGLang's own
algorithms (``is_draft_input`` / ``is_verify_input`` stay False), one token per row: to SGLang's
batch, graph and logits code the forward is the plain DECODE forward it is.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from sparsespec_sglang.compat import SpecInput


@dataclass
class DraftStep:
    """Per-request draft inputs beyond the ForwardBatch, in batch order.

    Full-size static buffers (rows >= any batch): a step of batch size B reads ``[:B]``, so the
    same buffers serve eager steps and captured draft graphs (rows past B read as empty).
    """

    dense_start: torch.Tensor  # [R] int32
    sel_lens: torch.Tensor  # [R] int32

    @classmethod
    def allocate(cls, max_rows: int, device: torch.device) -> "DraftStep":
        return cls(torch.zeros((max_rows,), dtype=torch.int32, device=device),
                   torch.zeros((max_rows,), dtype=torch.int32, device=device))

    def load(self, req_pool_indices: torch.Tensor, dense_start: torch.Tensor,
             sel_lens: torch.Tensor) -> None:
        """Gather the batch's rows of the per-request ``dense_start`` / ``sel_lens`` (by pool row)
        into batch order; rows past the batch are zeroed (graph padding: nothing selected)."""
        bs = req_pool_indices.shape[0]
        self.dense_start[:bs] = dense_start[req_pool_indices]
        self.sel_lens[:bs] = sel_lens[req_pool_indices]
        self.dense_start[bs:].zero_()
        self.sel_lens[bs:].zero_()


@dataclass
class MixedRows:
    """Inputs of a unified pass beyond the ForwardBatch, in static buffers (CUDA graphs replay them).

    A unified pass is a DECODE forward whose rows are single tokens: one row per drafting
    request, one per densely decoding request (adaptive speculation: a plain decode step of its
    request, the sparse decode over its whole context), then the verify chain of every verifying
    request (its rows ``qo_indptr[v]`` .. ``qo_indptr[v] + verify_lens[v]``). Per row:
    ``dense_start`` / ``sel_lens`` for the sparse decode (a dense row: 0 and no selection, its
    request's state after ``PillarState.stop_speculating``; a verify row: ``dense_start =
    seq_len`` and no selection, a sinks-only read that the verify kernel then overwrites). Per verifying request: pool row, prefix (its committed
    length), chain length, ``verify_end = prefix + length``. ``num_verify`` is the verify count of
    an eager pass; ``None`` while a CUDA graph is captured: a graph of R rows runs R // width
    verify entries, the spare ones empty requests on the reserved pool row 0. With draft-normalised
    scores the lse ring is keyed by pool row (``ring_rows``; verify and dense rows write the reserved
    row 0, never read).
    """

    width: int  # k + 1, the longest verify chain
    dense_start: torch.Tensor  # [T_max] int32
    sel_lens: torch.Tensor  # [T_max] int32
    ring_rows: torch.Tensor  # [T_max] int32 draft-lse ring row (pool row; 0 for verify rows)
    verify_rows: torch.Tensor  # [V_max] int32
    verify_prefix: torch.Tensor  # [V_max] int32
    verify_lens: torch.Tensor  # [V_max] int32
    verify_end: torch.Tensor  # [V_max] int32
    qo_indptr: torch.Tensor  # [V_max + 1] int32
    num_verify: int | None = None
    # How far the last fill wrote rows / verify entries: everything past it is already empty, so
    # a fill zeroes only what the previous one wrote beyond its own extent.
    _rows_written: int = field(default=0, init=False)
    _verify_written: int = field(default=0, init=False)

    @classmethod
    def allocate(cls, width: int, max_rows: int, device: torch.device) -> "MixedRows":
        max_verify = max_rows  # a pass of one-token verifies (newcomers' first cycle) at worst
        z = lambda n: torch.zeros((n,), dtype=torch.int32, device=device)  # noqa: E731
        return cls(width, z(max_rows), z(max_rows), z(max_rows), z(max_verify), z(max_verify),
                   z(max_verify), z(max_verify), z(max_verify + 1))

    def fill(self, pool: torch.Tensor, seq_lens: torch.Tensor, dense_start: torch.Tensor,
             sel_lens: torch.Tensor, qo_indptr: torch.Tensor, verify_pool: torch.Tensor,
             verify_prefix: torch.Tensor, verify_lens: torch.Tensor, num_draft: int,
             num_drafting: int) -> "ForwardPlan":
        """One pass's rows (``t = len(pool)``): rows [0, ``num_drafting``) draft, rows
        [``num_drafting``, ``num_draft``) are dense rows, which keep no draft lse, and the rest
        are the chains of the pass's ``nv`` verifying requests. ``dense_start`` / ``sel_lens``
        are the drafting and dense requests' per-request values (by row; read for the rows
        before ``num_draft``). Entries past the pass read as empty (no selection, no dense tail,
        no verify tokens), so a graph replay of a larger bucket reads only no-op padding. Returns
        the pass's plan."""
        t, nv, d = pool.shape[0], qo_indptr.shape[0] - 1, num_draft
        # A verify row reads sinks only (dense from its own length, no selection); the verify
        # kernel then overwrites its output.
        self.dense_start[:d] = dense_start[:d]
        self.dense_start[d:t] = seq_lens[d:]
        self.sel_lens[:d] = sel_lens[:d]
        self.sel_lens[d:t] = 0
        self.ring_rows[:num_drafting] = pool[:num_drafting]
        self.ring_rows[num_drafting:t] = 0
        if self._rows_written > t:
            for buffer in (self.dense_start, self.sel_lens, self.ring_rows):
                buffer[t:self._rows_written].zero_()
        self._rows_written = t
        if nv:
            self.verify_rows[:nv] = verify_pool
            self.verify_prefix[:nv] = verify_prefix
            self.verify_lens[:nv] = verify_lens
            self.verify_end[:nv] = verify_prefix + verify_lens
        if self._verify_written > nv:
            for buffer in (self.verify_rows, self.verify_prefix, self.verify_lens, self.verify_end):
                buffer[nv:self._verify_written].zero_()
        self._verify_written = nv
        self.qo_indptr[:nv + 1] = qo_indptr
        self.qo_indptr[nv + 1:] = t
        self.num_verify = nv
        return ForwardPlan.unified_pass(self)


class PlanKind(enum.Enum):
    SPARSE_DRAFT = "sparse_draft"  # every row is a draft step of one request
    UNIFIED_PASS = "unified_pass"  # draft rows and verify chains in one forward


class ForwardPlan(SpecInput):
    """The PillarAttn path of one DECODE forward and its per-row inputs, carried as the forward
    batch's ``spec_info``."""

    # One token per row (SGLang's graph runners compare this with their captured width).
    num_tokens_per_req = 1
    num_tokens_for_logprob_per_req = 1

    def __init__(self, kind: PlanKind, draft: Optional[DraftStep] = None,
                 rows: Optional[MixedRows] = None) -> None:
        super().__init__(spec_input_type=None)  # not one of SGLang's algorithms' inputs
        self.kind = kind
        self.draft = draft
        self.rows = rows

    @classmethod
    def sparse_draft(cls, step: DraftStep) -> "ForwardPlan":
        return cls(PlanKind.SPARSE_DRAFT, draft=step)

    @classmethod
    def unified_pass(cls, rows: MixedRows) -> "ForwardPlan":
        return cls(PlanKind.UNIFIED_PASS, rows=rows)

