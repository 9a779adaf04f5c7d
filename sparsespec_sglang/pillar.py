"""PillarState: per-request sparse index state on the GPU, keyed by req_pool_idx.

Keying by SGLang's request-pool row (stable while a request lives) instead of by
batch position means requests can join and leave the running batch every step
with no bookkeeping: the kernels read and write row ``req_pool_indices[b]``
directly (sparse decode reads the selection there, top-K writes it there). A new
occupant of a row always passes through prefill, which re-initialises the row
(:meth:`PillarState.init_window`), so a finished request's row needs no clean-up.
Row 0 is SGLang's reserved CUDA-graph padding row.

:class:`PillarState` is the one owner of that state: the worker and the schedules change it
only through its named transitions (:meth:`~PillarState.init_window`,
:meth:`~PillarState.set_pending`, :meth:`~PillarState.commit`, and for adaptive speculation
:meth:`~PillarState.stop_speculating` / :meth:`~PillarState.start_speculating`); the attention backend hands the
kernels its tables to read and the top-K output to write (the verify's selection) and never
assigns a field. What one forward is (its plan and the plan's per-row buffers) is not state:
it lives with the backend (``forward_plan.py``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.selection import SelectionPolicy

logger = logging.getLogger(__name__)


class PillarState:
    """Selection tables and scratch buffers shared by the schedules and the backend.

    - ``sel_indices [L, R, Hkv, max_sel]`` int32 slot ids chosen per layer and KV head;
    - ``sel_lens [R]`` int32 entries in use (the same K for every layer and head);
    - ``sel_recent [R]`` int32 how many of K the last verify's top-K left to the dense tail
      (``--sparsespec-selection`` hybrid / window: the most recent candidates; 0 for pillar);
    - ``dense_start [R]`` int32 first position attended densely by drafts;
    - ``pending [R]`` int64 each request's last emitted token, the first token of its next verify chain;
    - ``scores [R, Hkv, max_ctx]`` fp32, one layer's verify scores at a time
      (batch order; a batch never has more requests than pool rows R);
    - ``group_scores [G, V, Hkv, max_ctx]`` fp32 (unified schedule: ``group_scores=(G, V)``):
      the scores of G layers for up to V verifying requests, so the top-K of a group of layers
      runs as one launch;
    - ``draft_lse [L, R, Hq, k+1]`` fp32 (``--sparsespec-score-norm draft`` only), by pool row:
      each draft step's sparse lse by position modulo k+1, the verify's score normaliser.

    All of it is allocated here, after SGLang sized the KV pool (the selection tables need the
    request-pool shape), and logged with its size (:attr:`nbytes`). ``selection`` is the server's
    one :class:`~sparsespec_sglang.selection.SelectionPolicy` (K never above the table width).
    """

    def __init__(self, config: SparseSpecConfig, num_layers: int, num_q_heads: int,
                 num_kv_heads: int, req_to_token: torch.Tensor,
                 group_scores: Optional[tuple[int, int]] = None) -> None:
        self.config = config
        self.req_to_token = req_to_token
        num_rows, max_ctx = req_to_token.shape
        self.max_sel = min(config.max_selected, max_ctx)
        self.selection = SelectionPolicy.of(config, self.max_sel)
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
                   self.draft_lse, self.group_scores)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def num_selected(self, context_lens: torch.Tensor) -> torch.Tensor:
        """K per request (``sparsespec_sglang.selection``), never above the table width."""
        return self.selection.num_selected_tensor(context_lens)

    def init_window(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """First step after prefill: the K most recent prompt tokens (+ sinks, + dense tail).

        No verify scores exist yet; the window (``SelectionPolicy.first_window``) needs no score
        dump from SGLang's prefill kernels. ``seq_lens`` is the prompt length L, which is also
        the dense start (the first generated token's position).
        """
        if req_pool_indices.numel() == 0:
            return
        seq_lens = seq_lens.to(torch.int32)
        pos, k = self.selection.first_window(seq_lens, self.max_sel)
        rows = req_pool_indices.long()
        slots = self.req_to_token[rows.unsqueeze(1), pos.long()]  # [B, max_sel]
        valid = torch.arange(self.max_sel, device=seq_lens.device).unsqueeze(0) < k.unsqueeze(1)
        slots = torch.where(valid, slots, torch.zeros_like(slots))
        self.sel_indices[:, rows] = slots[None, :, None, :].to(torch.int32)
        self.sel_lens[rows] = k
        self.dense_start[rows] = seq_lens

    def set_pending(self, req_pool_indices: torch.Tensor, tokens: torch.Tensor) -> None:
        """A prefill emitted each request's first token, or a dense row its next one: the next
        forward's input."""
        self.pending[req_pool_indices] = tokens.to(torch.int64)

    def stop_speculating(self, req_pool_indices: torch.Tensor) -> None:
        """These requests decode densely: no selection and a dense tail from position 0, so the
        sparse decode kernel attends to their whole context (no sinks apart: it reads them as
        part of the dense range), which is a plain decode step's attention."""
        self.dense_start[req_pool_indices] = 0
        self.sel_lens[req_pool_indices] = 0

    def start_speculating(self, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """These requests speculate again after dense steps: no verify scores are fresh, so their
        selection is the first-step window at their committed length ``seq_lens``, as after a
        prefill of that length (:meth:`init_window`); their pending token is unchanged."""
        self.init_window(req_pool_indices, seq_lens)

    def commit(self, req_pool_indices: torch.Tensor, window_start: torch.Tensor,
               last_tokens: torch.Tensor) -> None:
        """A verify accepted: the request's last accepted token is the next draft's first input,
        and its verify window (from ``window_start``, the committed length before the verify) is
        the next drafts' dense tail, from ``sel_recent`` positions before it (the recent part of a
        hybrid or window selection). Its selection was written by the verify's top-K."""
        self.pending[req_pool_indices] = last_tokens.to(torch.int64)
        self.dense_start[req_pool_indices] = window_start.to(torch.int32) - self.sel_recent[req_pool_indices]
