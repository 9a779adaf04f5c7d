"""PillarState: per-request sparse index state on the GPU, keyed by req_pool_idx; ForwardPlan.

Keying by SGLang's request-pool row (stable while a request lives) instead of by
batch position means requests can join and leave the running batch every step
with no bookkeeping: the kernels read and write row ``req_pool_indices[b]``
directly (sparse decode reads the selection there, top-K writes it there). A new
occupant of a row always passes through prefill, which re-initialises the row
(:meth:`PillarState.init_window`), so a finished request's row needs no clean-up.
Row 0 is SGLang's reserved CUDA-graph padding row.

:class:`PillarState` is the one owner of that state: the worker and the schedules change it
only through its named transitions (:meth:`~PillarState.init_window`,
:meth:`~PillarState.set_pending`, :meth:`~PillarState.load_draft_step`,
:meth:`~PillarState.commit`); the attention backend hands the kernels its tables to read and
the top-K output to write (the verify's selection) and never assigns a field.

:class:`ForwardPlan` is what a schedule tells the attention backend about one forward: which
PillarAttn path it takes and that path's per-row inputs (:class:`DraftStep`, :class:`MixedRows`).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.selection import SelectionPolicy


@dataclass
class DraftStep:
    """Per-request draft inputs beyond the ForwardBatch, in batch order.

    Full-size static buffers (rows >= any batch): a step of batch size B reads
    ``[:B]``, so the same buffers serve eager steps and captured draft graphs.
    """

    dense_start: torch.Tensor  # [R] int32
    sel_lens: torch.Tensor  # [R] int32


@dataclass
class MixedRows:
    """Inputs of a unified pass beyond the ForwardBatch, in static buffers (CUDA graphs replay them).

    A unified pass is a DECODE forward whose rows are single tokens: one row per drafting
    request, then the verify chain of every verifying request (its rows ``qo_indptr[v]`` ..
    ``qo_indptr[v] + verify_lens[v]``). Per row: ``dense_start`` / ``sel_lens`` for the sparse
    decode (a verify row gets ``dense_start = seq_len`` and no selection: a sinks-only read that
    the verify kernel then overwrites). Per verifying request: pool row, prefix (its committed
    length), chain length, ``verify_end = prefix + length``. ``num_verify`` is the verify count of
    an eager pass; ``None`` in a CUDA graph, whose spare verify entries (``verify_slots``) are
    empty requests on the reserved pool row 0. With draft-normalised scores the lse ring is
    keyed by pool row (``ring_rows``; verify rows write the reserved row 0, never read).
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

    @classmethod
    def allocate(cls, width: int, max_rows: int, device: torch.device) -> "MixedRows":
        max_verify = max_rows  # a pass of one-token verifies (newcomers' first cycle) at worst
        z = lambda n: torch.zeros((n,), dtype=torch.int32, device=device)  # noqa: E731
        return cls(width, z(max_rows), z(max_rows), z(max_rows), z(max_verify), z(max_verify),
                   z(max_verify), z(max_verify), z(max_verify + 1))

    def pad_for_graph(self, num_rows: int, graph_rows: int, num_verify: int) -> None:
        """Make rows [num_rows, graph_rows) and the spare verify entries of a graph replay
        no-ops (padding rows: no selection, no dense tail; spare verifies: no tokens)."""
        self.dense_start[num_rows:graph_rows].zero_()
        self.sel_lens[num_rows:graph_rows].zero_()
        self.ring_rows[num_rows:graph_rows].zero_()
        spare = slice(num_verify, graph_rows // self.width)
        for t in (self.verify_rows, self.verify_prefix, self.verify_lens, self.verify_end):
            t[spare].zero_()
        self.qo_indptr[num_verify + 1:graph_rows // self.width + 1] = num_rows
        self.num_verify = None

    def verify_slots(self, num_rows: int) -> int:
        """Verify entries a pass of ``num_rows`` rows runs (exact when eager)."""
        return self.num_verify if self.num_verify is not None else num_rows // self.width


class PlanKind(enum.Enum):
    PLAIN = "plain"  # SGLang's Triton paths; a TARGET_VERIFY forward is the PillarAttn verify
    SPARSE_DRAFT = "sparse_draft"  # every row is a draft step of one request
    UNIFIED_PASS = "unified_pass"  # draft rows and verify chains in one forward


@dataclass(frozen=True)
class ForwardPlan:
    """The attention path of one forward and its per-row inputs (static buffers, so a CUDA graph
    captured under a plan replays with whatever the buffers hold at replay time)."""

    kind: PlanKind
    draft: Optional[DraftStep] = None
    rows: Optional[MixedRows] = None

    @classmethod
    def plain(cls) -> "ForwardPlan":
        return _PLAIN

    @classmethod
    def sparse_draft(cls, step: DraftStep) -> "ForwardPlan":
        return cls(PlanKind.SPARSE_DRAFT, draft=step)

    @classmethod
    def unified_pass(cls, rows: MixedRows) -> "ForwardPlan":
        return cls(PlanKind.UNIFIED_PASS, rows=rows)


_PLAIN = ForwardPlan(PlanKind.PLAIN)

logger = logging.getLogger(__name__)


class PillarState:
    """Selection tables and scratch buffers shared by the schedules and the backend.

    - ``sel_indices [L, R, Hkv, max_sel]`` int32 slot ids chosen per layer and KV head;
    - ``sel_lens [R]`` int32 entries in use (the same K for every layer and head);
    - ``sel_recent [R]`` int32 how many of K the last verify's top-K left to the dense tail
      (``--sparsespec-selection`` hybrid / window: the most recent candidates; 0 for pillar);
    - ``dense_start [R]`` int32 first position attended densely by drafts;
    - ``pending [R]`` int64 each request's last emitted token, the next cycle's first input;
    - ``scores [R, Hkv, max_ctx]`` fp32, one layer's verify scores at a time
      (batch order; a batch never has more requests than pool rows R);
    - ``group_scores [G, V, Hkv, max_ctx]`` fp32 (unified schedule: ``group_scores=(G, V)``):
      the scores of G layers for up to V verifying requests, so the top-K of a group of layers
      runs as one launch;
    - ``draft_step``: batch-ordered copies of ``dense_start``/``sel_lens`` that the
      draft steps (and their CUDA graphs) read, refreshed once per cycle;
    - ``draft_lse [L, R, Hq, k+1]`` fp32 (``--sparsespec-score-norm draft`` only), by pool row:
      each draft step's sparse lse by position modulo k+1, the verify's score normaliser.

    All of it is allocated here, after SGLang sized the KV pool (the selection tables need the
    request-pool shape), and logged with its size (:attr:`nbytes`).
    """

    def __init__(self, config: SparseSpecConfig, num_layers: int, num_q_heads: int,
                 num_kv_heads: int, req_to_token: torch.Tensor,
                 group_scores: Optional[tuple[int, int]] = None) -> None:
        self.config = config
        self.req_to_token = req_to_token
        num_rows, max_ctx = req_to_token.shape
        self.max_sel = min(config.max_selected, max_ctx)
        device = req_to_token.device
        self.sel_indices = torch.zeros((num_layers, num_rows, num_kv_heads, self.max_sel),
                                       dtype=torch.int32, device=device)
        self.sel_lens = torch.zeros((num_rows,), dtype=torch.int32, device=device)
        self.sel_recent = torch.zeros((num_rows,), dtype=torch.int32, device=device)
        self.dense_start = torch.zeros((num_rows,), dtype=torch.int32, device=device)
        self.pending = torch.zeros((num_rows,), dtype=torch.int64, device=device)
        self.scores = torch.zeros((num_rows, num_kv_heads, max_ctx),
                                  dtype=torch.float32, device=device)
        self.draft_lse = (
            torch.zeros((num_layers, num_rows, num_q_heads, config.num_draft_steps + 1),
                        dtype=torch.float32, device=device)
            if config.score_norm == "draft" else None
        )
        self.group_scores = None
        if group_scores is not None and group_scores[1] > 0:
            layers, requests = group_scores
            self.group_scores = torch.zeros((min(layers, num_layers), requests, num_kv_heads, max_ctx),
                                            dtype=torch.float32, device=device)
        self.draft_step = DraftStep(dense_start=torch.zeros_like(self.dense_start),
                                    sel_lens=torch.zeros_like(self.sel_lens))
        group = ("none" if self.group_scores is None else
                 f"{self.group_scores.shape[0]} layers x {self.group_scores.shape[1]} requests")
        logger.info("SPARSESPEC state: %d layers x %d rows x %d KV heads x %d selected, grouped "
                    "top-K scores for %s, %.1f MiB of GPU memory outside SGLang's KV budget "
                    "(lower --mem-fraction-static by that much if the GPU runs short)",
                    num_layers, num_rows, num_kv_heads, self.max_sel, group, self.nbytes / 2**20)

    @property
    def nbytes(self) -> int:
        """GPU bytes of every buffer this state holds."""
        tensors = (self.sel_indices, self.sel_lens, self.sel_recent, self.dense_start, self.pending, self.scores,
                   self.draft_lse, self.group_scores, self.draft_step.dense_start,
                   self.draft_step.sel_lens)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def load_draft_step(self, req_pool_indices: torch.Tensor) -> DraftStep:
        """Gather this cycle's per-request draft inputs into batch order (rows past B zeroed)."""
        bs = req_pool_indices.shape[0]
        step = self.draft_step
        step.dense_start[:bs] = self.dense_start[req_pool_indices]
        step.sel_lens[:bs] = self.sel_lens[req_pool_indices]
        step.dense_start[bs:].zero_()
        step.sel_lens[bs:].zero_()
        return step

    def num_selected(self, context_lens: torch.Tensor) -> torch.Tensor:
        """K per request (``sparsespec_sglang.selection``), never above the table width."""
        return SelectionPolicy.of(self.config, self.max_sel).num_selected_tensor(context_lens)

    def init_window(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """First cycle after prefill: the K most recent prompt tokens (+ sinks, + dense tail).

        No verify scores exist yet; a recent window is what the prefill's last
        queries attend to most in practice, and it needs no score dump from
        SGLang's prefill kernels. ``seq_lens`` is the prompt length L, which is
        also the dense start (the first generated token's position).
        """
        if req_pool_indices.numel() == 0:
            return
        seq_lens = seq_lens.to(torch.int32)
        k = SelectionPolicy.of(self.config, self.max_sel).num_selected_tensor(seq_lens, cand_end=seq_lens)
        j = torch.arange(self.max_sel, device=seq_lens.device, dtype=torch.int32)
        pos = (seq_lens - k).unsqueeze(1) + j.unsqueeze(0)  # [B, max_sel]
        valid = j.unsqueeze(0) < k.unsqueeze(1)
        pos = torch.where(valid, pos, torch.zeros_like(pos)).long()
        rows = req_pool_indices.long()
        slots = self.req_to_token[rows.unsqueeze(1), pos]  # [B, max_sel]
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        self.sel_indices[:, rows] = slots[None, :, None, :].to(torch.int32)
        self.sel_lens[rows] = k
        self.dense_start[rows] = seq_lens

    def set_pending(self, req_pool_indices: torch.Tensor, tokens: torch.Tensor) -> None:
        """A prefill emitted each request's first token: the first cycle's first input."""
        self.pending[req_pool_indices] = tokens.to(torch.int64)

    def commit(self, req_pool_indices: torch.Tensor, window_start: torch.Tensor,
               last_tokens: torch.Tensor) -> None:
        """A verify accepted: the request's last accepted token is the next cycle's first input,
        and its verify window (from ``window_start``, the committed length before the verify) is
        the next drafts' dense tail, from ``sel_recent`` positions before it (the recent part of a
        hybrid or window selection). Its selection was written by the verify's top-K."""
        self.pending[req_pool_indices] = last_tokens.to(torch.int64)
        self.dense_start[req_pool_indices] = window_start.to(torch.int32) - self.sel_recent[req_pool_indices]
