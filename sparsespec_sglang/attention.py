"""The ``sparsespec`` attention backend: SGLang's Triton backend plus the PillarAttn paths.

The forward batch says what a forward is, as it does for SGLang's own speculative algorithms:
its forward mode, and its ``spec_info``. Prefill and ordinary decode go to
:class:`TritonAttnBackend` unchanged. Three forwards of a SPARSESPEC step take the plugin's kernels
instead:

- a *draft step* (a DECODE forward whose ``spec_info`` is a ``SPARSE_DRAFT``
  :class:`~sparsespec_sglang.forward_plan.ForwardPlan`, lockstep schedule): sparse decode over
  sink + selected + dense-tail slots (``kernels/sparse_decode.py``);
- a *unified pass* (a DECODE forward carrying a ``UNIFIED_PASS`` plan, unified schedule): draft
  rows take the sparse decode, the verifying requests' rows the verify kernel with the score
  dump and top-K below, in the same forward;
- a *verify pass* (TARGET_VERIFY, SGLang's own verify forward with its ``NgramVerifyInput``):
  causal attention of the k+1 verify tokens that also dumps per-position scores
  (``kernels/verify_attention.py``), turned into the next step's index table per layer right away
  (``kernels/topk_select.py``), so no extra pass over the KV is scheduled. With
  ``--enable-deterministic-inference`` the verify's attention runs instead as one
  SGLang deterministic decode per verify token, so greedy output is bitwise plain
  SGLang's (the exact score pass then runs on its own).

The backend keeps no per-forward state: everything a forward needs is on its batch (the plan's
buffers) or in :class:`~sparsespec_sglang.pillar.PillarState` (per-request tables).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from sparsespec_sglang.compat import TritonAttnBackend, logit_capping_mod

from sparsespec_sglang.deterministic import verify_as_decode_rows
from sparsespec_sglang.forward_plan import ForwardPlan, MixedRows, PlanKind
from sparsespec_sglang.kernels.attention_common import MAX_KV_SPLITS, pick_num_kv_splits, sm_count
from sparsespec_sglang.kernels.sparse_decode import sparse_decode_attention
from sparsespec_sglang.kernels.topk_select import select_topk
from sparsespec_sglang.kernels.verify_attention import verify_attention_with_scores, verify_scores
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.selection import layer_group


def plan_of(forward_batch: Any) -> Optional[ForwardPlan]:
    """The plan a forward batch carries as its ``spec_info``, or None (SGLang's own forward)."""
    spec_info = getattr(forward_batch, "spec_info", None)
    return spec_info if isinstance(spec_info, ForwardPlan) else None


def graph_verify_splits(num_entries: int, num_kv_heads: int, num_sms: int) -> int:
    """The KV split count of a captured unified pass's verify rows. The graph has ``num_entries``
    verify entries, about half of them real, and how many are real varies from pass to pass (the
    spare ones exit at once). Counted for half of them at one program per SM and rounded up, the
    split count leaves room for more real entries than half before a second round of programs
    starts, which ``pick_num_kv_splits`` (an exact count, two programs per SM, rounded down) would
    not: with 4-6 real of 9 entries (H100) it gives 5 splits, one round up to 6 real, where 8
    splits would run a second round for 5 or 6."""
    return max(1, min(MAX_KV_SPLITS, -(-num_sms // max(1, (num_entries // 2) * num_kv_heads))))


class SparseSpecAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(model_runner, *args, **kwargs)
        self.state: Optional[PillarState] = None
        self._verify_consts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._graph_state_size: tuple[int, int] = (0, 0)
        self._num_sms = sm_count(torch.device(self.device))
        self.make_streams(torch.device(self.device))

    def make_streams(self, device: torch.device) -> None:
        """Unified passes: the verify rows run beside the draft rows (high priority: their
        programs are the long ones), the grouped top-K beside the next layers."""
        self._streams = torch.get_device_module(device)
        self._verify_stream = self._streams.Stream(priority=-1)
        self._topk_stream = self._streams.Stream()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args: Any, **kwargs: Any) -> None:
        # The verify and the draft graph runners share this backend; keep the
        # larger buffers instead of reallocating for the smaller draft width.
        if max_bs <= self._graph_state_size[0] and max_num_tokens <= self._graph_state_size[1]:
            return
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self._graph_state_size = (max_bs, max_num_tokens)

    def attach(self, state: PillarState) -> None:
        """Called by the worker once the KV pools (and so the state) exist."""
        self.state = state

    def _is_pillar_path(self, forward_batch: Any) -> bool:
        """A forward that takes a PillarAttn path: a DECODE forward carrying a plan, or a verify."""
        if self.state is None:
            return False
        mode = forward_batch.forward_mode
        return mode.is_target_verify() or (mode.is_decode() and plan_of(forward_batch) is not None)

    def init_forward_metadata(self, forward_batch: Any) -> None:
        # The PillarAttn kernels read req_to_token / seq_lens straight from the
        # forward batch; the Triton kv_indices build would be wasted work.
        if self._is_pillar_path(forward_batch):
            return
        super().init_forward_metadata(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        # Verify and draft CUDA graphs read only graph-static buffers on the PillarAttn paths.
        if self._is_pillar_path(forward_batch):
            return
        super().init_forward_metadata_out_graph(forward_batch, in_capture)

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        if self._is_pillar_path(forward_batch):
            return
        super().init_forward_metadata_in_graph(forward_batch)

    def _save_kv(self, layer: Any, forward_batch: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        self.token_to_kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        plan = plan_of(forward_batch)
        if plan is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks,
                                          score_mod, aux_tensors)
        assert sinks is None and score_mod is None, "SPARSESPEC drafts: no attention sinks/score_mod"
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v)
        if plan.kind is PlanKind.UNIFIED_PASS:
            return self._forward_mixed(q, layer, forward_batch, plan.rows)
        state, step = self.state, plan.draft
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        bs = q.shape[0]
        o = q.new_empty((bs, hq * dv))
        sparse_decode_attention(
            q.view(-1, hq, d),
            self.token_to_kv_pool.get_key_buffer(layer.layer_id),
            self.token_to_kv_pool.get_value_buffer(layer.layer_id),
            o.view(-1, hq, dv),
            req_to_token=state.req_to_token,
            req_pool_indices=forward_batch.req_pool_indices,
            seq_lens=forward_batch.seq_lens,
            dense_start=step.dense_start[:bs],
            sel_indices=state.sel_indices[layer.layer_id],
            sel_lens=step.sel_lens[:bs],
            num_sink=state.config.num_sink_tokens,
            sm_scale=layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            num_kv_splits=pick_num_kv_splits(bs, self.token_to_kv_pool.head_num, self._num_sms),
            # the lse ring is keyed by pool row, as in a unified pass (PillarState.draft_lse)
            lse_ring=None if state.draft_lse is None else state.draft_lse[layer.layer_id],
            ring_rows=None if state.draft_lse is None else forward_batch.req_pool_indices,
        )
        return o

    def _forward_mixed(self, q: torch.Tensor, layer: Any, forward_batch: Any,
                       rows: MixedRows) -> torch.Tensor:
        """One layer of a unified pass: rows are single tokens (DECODE), the plan's rows say
        which rows belong to verifying requests. The verify kernel (full causal attention with
        the score dump) runs on a side stream over the verify rows while the sparse decode runs
        the draft rows on the forward's stream: the verify of a pass's few verifying requests is
        latency-bound, so on its own it would leave most SMs idle. The top-K of a group of layers
        runs on a third stream, overlapping the next layers, and is joined before the group
        buffer is written again (and by the pass's last layer).

        Which stream waits for which follows from the layer alone (the same for every forward of
        the pass's shape, so a CUDA graph captures it): in a grouped pass every group but the
        last is selected on the top-K stream, the last on the verify stream at the last layer."""
        state, config = self.state, self.state.config
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        bs = q.shape[0]
        o = q.new_empty((bs, hq * dv))
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        logit_cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        ring = None if state.draft_lse is None else state.draft_lse[layer.layer_id]
        num_kv_heads = self.token_to_kv_pool.head_num
        # Verify entries: exact when eager; a captured graph runs every entry its bucket has room
        # for (the spare ones empty, MixedRows.fill).
        nv = rows.num_verify if rows.num_verify is not None else bs // rows.width
        # Scores of a group of layers are kept and selected in one launch at the group's last
        # layer (per layer, the top-K of the few verifying requests is latency-bound); passes
        # with more verifying requests than the group buffer holds select layer by layer.
        lid, group, num_layers = layer.layer_id, state.group_scores, state.sel_indices.shape[0]
        grouped = bool(nv) and group is not None and nv <= group.shape[1]
        layers = layer_group(lid, group.shape[0] if grouped else 1, num_layers)
        main = self._streams.current_stream()
        if nv:
            self._verify_stream.wait_stream(main)  # q and this layer's KV are written
            if grouped and lid == layers.start and lid > 0:
                # The previous group's top-K (on its stream) still reads the buffer this layer
                # overwrites.
                self._verify_stream.wait_stream(self._topk_stream)
            with self._streams.stream(self._verify_stream):
                self._verify_rows(q.view(-1, hq, d), k_buffer, v_buffer, o.view(-1, hq, dv), layer,
                                  rows, logit_cap, ring, nv, num_kv_heads, layers if grouped else None)
        sparse_decode_attention(
            q.view(-1, hq, d), k_buffer, v_buffer, o.view(-1, hq, dv), req_to_token=state.req_to_token,
            req_pool_indices=forward_batch.req_pool_indices, seq_lens=forward_batch.seq_lens,
            dense_start=rows.dense_start[:bs], sel_indices=state.sel_indices[layer.layer_id],
            sel_lens=rows.sel_lens[:bs], num_sink=config.num_sink_tokens, sm_scale=layer.scaling,
            logit_cap=logit_cap,
            num_kv_splits=pick_num_kv_splits(bs, num_kv_heads, self._num_sms),
            lse_ring=ring, ring_rows=None if ring is None else rows.ring_rows[:bs],
            skip_rows=(rows.qo_indptr, nv) if nv else None,
        )
        if nv:
            main.wait_stream(self._verify_stream)
        if grouped and lid + 1 == num_layers and layers.start > 0:
            main.wait_stream(self._topk_stream)  # every stream rejoins before the pass ends
        return o

    def _verify_rows(self, q, k_buffer, v_buffer, o, layer, rows: MixedRows, logit_cap, ring,
                     nv: int, num_kv_heads: int, layers: Optional[range]) -> None:
        """The verify rows of one layer of a unified pass, and the top-K of a finished group
        (``layers``: this layer's group; None: select this layer alone)."""
        state, config = self.state, self.state.config
        lid = layer.layer_id
        group = state.group_scores
        scores = group[lid - layers.start, :nv] if layers is not None else state.scores[:nv]
        verify_attention_with_scores(
            q, k_buffer, v_buffer, o, req_to_token=state.req_to_token,
            req_pool_indices=rows.verify_rows[:nv], prefix_lens=rows.verify_prefix[:nv],
            extend_lens=rows.verify_lens[:nv], qo_indptr=rows.qo_indptr[:nv + 1], scores=scores,
            sm_scale=layer.scaling, aggregation=config.aggregation, logit_cap=logit_cap,
            num_kv_splits=(pick_num_kv_splits(nv, num_kv_heads, self._num_sms) if rows.num_verify is not None
                           else graph_verify_splits(nv, num_kv_heads, self._num_sms)),
            score_lse=ring, max_ext=rows.width,
            score_lse_rows=None if ring is None else rows.verify_rows[:nv],
        )
        if layers is None:
            # joined by this layer (state.scores is reused by the next layer)
            self._select(scores, range(lid, lid + 1), rows.verify_rows[:nv], rows.verify_prefix[:nv],
                         rows.verify_end[:nv])
            return
        if lid != layers.stop - 1:
            return  # the group's last layer selects for all of them
        scores = group[:len(layers), :nv]
        if lid + 1 == state.sel_indices.shape[0]:
            self._select(scores, layers, rows.verify_rows[:nv], rows.verify_prefix[:nv],
                         rows.verify_end[:nv])
            return
        self._topk_stream.wait_stream(self._verify_stream)
        with self._streams.stream(self._topk_stream):
            self._select(scores, layers, rows.verify_rows[:nv], rows.verify_prefix[:nv],
                         rows.verify_end[:nv])

    def _select(self, scores: torch.Tensor, layers: range, req_pool_indices: torch.Tensor,
                window_start: torch.Tensor, window_end: torch.Tensor) -> None:
        """The next selection of ``layers`` for requests that verified positions [window_start,
        window_end): the candidates end where the window starts (the window becomes the drafts'
        dense tail, ``PillarState.commit``) and K follows the context length, the window's end
        (``selection.py``). Written straight into each request's pool row (CUDA-graph padding
        uses the reserved row 0)."""
        state = self.state
        select_topk(
            scores, state.selection, req_to_token=state.req_to_token,
            req_pool_indices=req_pool_indices, seq_lens=window_end, cand_end=window_start,
            out_indices=state.sel_indices[layers.start:layers.stop], out_lens=state.sel_lens,
            out_recent=state.sel_recent,
        )

    def _verify_layout(self, batch_size: int, width: int, device: torch.device):
        key = (batch_size, width)
        if key not in self._verify_consts:
            extend_lens = torch.full((batch_size,), width, dtype=torch.int32, device=device)
            qo_indptr = torch.arange(0, batch_size + 1, dtype=torch.int32, device=device) * width
            self._verify_consts[key] = (extend_lens, qo_indptr)
        return self._verify_consts[key]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        if self.state is None or not forward_batch.forward_mode.is_target_verify():
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks,
                                          score_mod, aux_tensors)
        assert sinks is None and score_mod is None, "SPARSESPEC verify: no attention sinks/score_mod"
        if save_kv_cache:
            self._save_kv(layer, forward_batch, k, v)
        state, config = self.state, self.state.config
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        batch_size = forward_batch.batch_size
        width = q.shape[0] // batch_size
        extend_lens, qo_indptr = self._verify_layout(batch_size, width, q.device)
        prefix_lens = forward_batch.seq_lens
        o = q.new_empty((q.shape[0], hq * dv))
        scores = state.scores[:batch_size]
        k_buffer = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        logit_cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        if self.enable_deterministic:
            scaled = layer.k_scale is not None and layer.v_scale is not None
            lse = verify_as_decode_rows(
                self.decode_attention_fwd, q.view(-1, hq, d), k_buffer,
                self.token_to_kv_pool.get_value_buffer(layer.layer_id), o.view(-1, hq, dv),
                state.req_to_token, forward_batch.req_pool_indices, prefix_lens, width,
                self.split_tile_size, self.max_kv_splits, layer.scaling,
                layer.k_scale_float if scaled else 1.0, layer.v_scale_float if scaled else 1.0,
                logit_cap=logit_cap, xai_temperature_len=layer.xai_temperature_len,
                use_pdl=self.use_pdl, page_size=self.page_size,
            )
            verify_scores(q.view(-1, hq, d), k_buffer, req_to_token=state.req_to_token,
                          req_pool_indices=forward_batch.req_pool_indices, prefix_lens=prefix_lens,
                          extend_lens=extend_lens, qo_indptr=qo_indptr, lse=lse, scores=scores,
                          sm_scale=layer.scaling, aggregation=config.aggregation, logit_cap=logit_cap)
        else:
            verify_attention_with_scores(
                q.view(-1, hq, d), k_buffer, self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                o.view(-1, hq, dv), req_to_token=state.req_to_token,
                req_pool_indices=forward_batch.req_pool_indices, prefix_lens=prefix_lens,
                extend_lens=extend_lens, qo_indptr=qo_indptr, scores=scores, sm_scale=layer.scaling,
                aggregation=config.aggregation, logit_cap=logit_cap,
                score_lse=None if state.draft_lse is None else state.draft_lse[layer.layer_id],
                score_lse_rows=None if state.draft_lse is None else forward_batch.req_pool_indices,
            )
        self._select(scores, range(layer.layer_id, layer.layer_id + 1), forward_batch.req_pool_indices,
                     prefix_lens, prefix_lens + width)
        return o


def create_backend(model_runner: Any) -> SparseSpecAttnBackend:
    """Factory registered under ``--attention-backend sparsespec``."""
    if model_runner.use_mla_backend:
        raise ValueError("--attention-backend sparsespec: MLA models are not supported")
    return SparseSpecAttnBackend(model_runner)
