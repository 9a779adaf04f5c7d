"""PillarState: per-request sparse index state on the GPU, keyed by req_pool_idx.

Keying by SGLang's request-pool row (stable while a request lives) instead of by
batch position means requests can join and leave the running batch every step
with no bookkeeping: the kernels read and write row ``req_pool_indices[b]``
directly (sparse decode reads the selection there, top-K writes it there). A new
occupant of a row always passes through prefill, which re-initialises the row
(:meth:`init_window`). Row 0 is SGLang's reserved CUDA-graph padding row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from sparsespec_sglang.config import SparseSpecConfig


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
    """Inputs of a unified pass beyond the ForwardBatch (issue 5), static buffers.

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


logger = logging.getLogger(__name__)


class PillarState:
    """Selection tables and scratch buffers shared by the worker and the backend.

    - ``sel_indices [L, R, Hkv, max_sel]`` int32 slot ids chosen per layer and KV head;
    - ``sel_lens [R]`` int32 entries in use (the same K for every layer and head);
    - ``dense_start [R]`` int32 first position attended densely by drafts;
    - ``pending [R]`` int64 each request's last emitted token, the next cycle's first input;
    - ``scores [R, Hkv, max_ctx]`` fp32, one layer's verify scores at a time
      (batch order; a batch never has more requests than pool rows R);
    - ``group_scores`` (unified passes only, :meth:`keep_group_scores`): several layers' scores;
    - ``draft_step``: batch-ordered copies of ``dense_start``/``sel_lens`` that the
      draft steps (and their CUDA graphs) read, refreshed once per cycle;
    - ``draft_lse [L, R, Hq, k+1]`` fp32 (``--sparsespec-score-norm draft`` only), batch order:
      each draft step's sparse lse by position modulo k+1, the verify's score normaliser.
    """

    def __init__(self, config: SparseSpecConfig, num_layers: int, num_q_heads: int,
                 num_kv_heads: int, req_to_token: torch.Tensor) -> None:
        self.config = config
        self.req_to_token = req_to_token
        num_rows, max_ctx = req_to_token.shape
        self.max_sel = min(config.max_selected, max_ctx)
        device = req_to_token.device
        self.sel_indices = torch.zeros((num_layers, num_rows, num_kv_heads, self.max_sel),
                                       dtype=torch.int32, device=device)
        self.sel_lens = torch.zeros((num_rows,), dtype=torch.int32, device=device)
        self.dense_start = torch.zeros((num_rows,), dtype=torch.int32, device=device)
        self.pending = torch.zeros((num_rows,), dtype=torch.int64, device=device)
        self.scores = torch.zeros((num_rows, num_kv_heads, max_ctx),
                                  dtype=torch.float32, device=device)
        self.draft_lse = (
            torch.zeros((num_layers, num_rows, num_q_heads, config.num_draft_steps + 1),
                        dtype=torch.float32, device=device)
            if config.score_norm == "draft" else None
        )
        self.group_scores: torch.Tensor | None = None  # see keep_group_scores
        self.draft_step = DraftStep(dense_start=torch.zeros_like(self.dense_start),
                                    sel_lens=torch.zeros_like(self.sel_lens))
        nbytes = sum(t.numel() * t.element_size() for t in
                     (self.sel_indices, self.sel_lens, self.dense_start, self.scores, self.draft_lse)
                     if t is not None)
        logger.info("SPARSESPEC state: %d layers x %d rows x %d KV heads x %d selected, "
                    "%.1f MiB", num_layers, num_rows, num_kv_heads, self.max_sel, nbytes / 2**20)

    def keep_group_scores(self, layers_per_group: int, max_verify: int) -> None:
        """Unified passes: keep the verify scores of ``layers_per_group`` layers for up to
        ``max_verify`` verifying requests (``group_scores [G, V, Hkv, max_ctx]`` fp32), so the
        top-K of a group of layers runs as one launch."""
        num_layers, _, num_kv_heads, _ = self.sel_indices.shape
        shape = (min(layers_per_group, num_layers), max_verify, num_kv_heads, self.scores.shape[2])
        self.group_scores = torch.zeros(shape, dtype=torch.float32, device=self.scores.device)
        logger.info("SPARSESPEC: top-K over groups of %d layers for up to %d verifying requests "
                    "per pass, %.1f MiB", shape[0], max_verify,
                    self.group_scores.numel() * 4 / 2**20)

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
        """K per request: clamp(ceil(s * len), min, max), never above the table width."""
        k = torch.ceil(context_lens.to(torch.float64) * self.config.sparsity).to(torch.int32)
        return k.clamp(min=self.config.min_selected, max=self.config.max_selected).clamp(
            max=self.max_sel)

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
        sink = self.config.num_sink_tokens
        num_cand = (seq_lens - sink).clamp(min=0)
        k = torch.minimum(self.num_selected(seq_lens), num_cand)
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
