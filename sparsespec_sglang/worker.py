"""SparseSpecWorker: the SGLang V2 speculative worker of SPARSESPEC, a thin adapter.

It drafts with the target model itself (no draft model) and does three things: prefill (the
target worker's own forward, then the first-step window), dispatch of a decode batch to a
*schedule* (``schedule.py``: ``--sparsespec-schedule``, unified by default; batches the schedule
cannot run, e.g. ones that need per-token logprobs, fall back to lockstep), and the result in
SGLang's spec-v2 shape. The scheduler sees an NGRAM-shaped algorithm
(``SparseSpecAlgo.is_ngram()``): chain verify through ``NgramVerifyInput``, accept lengths that
include the bonus token, the committed lengths published through ``on_publish``.

Drafts are the argmax of the sparse model, i.e. a deterministic proposal, so SGLang's target-only
acceptance (``eagle_sample``, fed plain sampling's target distribution; ``acceptance.py``, the
one module that decides acceptance for both schedules) is exact speculative sampling for
temperature > 0 and exact prefix matching for greedy: output is lossless.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from sparsespec_sglang.compat import (
    ATTENTION_BACKENDS,
    BaseSpecWorker,
    GenerationBatchResult,
    NgramVerifyInput,
    ScheduleBatch,
    get_exec,
    get_observability,
    get_parallel,
    get_tp_group,
    get_serving,
    record_stream_for_v2_verify,
    req_pool_row,
)

from sparsespec_sglang.attention import SparseSpecAttnBackend
from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.profiling import CycleProfiler
from sparsespec_sglang.schedule import Schedule, ScheduleContext, StepResult, TPGroup, schedule_class
from sparsespec_sglang.validation import sparsespec_config

logger = logging.getLogger(__name__)

FALLBACK_SCHEDULE = "lockstep"  # runs every batch: logprobs, grammars, hidden states


class SparseSpecWorker(BaseSpecWorker):
    """Built by SGLang's scheduler with keyword arguments. Settings SGLang resolves come from its
    runtime context (``get_parallel()``, ``get_exec()``, ...), as its own workers read them: the
    ``server_args`` record keeps the raw input on newer releases."""

    def __init__(self, server_args: Any, gpu_id: int, nccl_port: int, target_worker: Any,
                 ps: Any = None) -> None:
        # ``ps`` (the parallel state) is passed by releases before 0.5.21; ranks come from
        # get_parallel() on every release.
        super().__init__()
        self.server_args = server_args
        # The config validation attached to the record when SGLang resolved it (never rebuilt).
        self.config: SparseSpecConfig = sparsespec_config(server_args)
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.k = self.config.num_draft_steps
        self.draft_token_num = self.k + 1
        self.speculative_num_steps = self.k
        self.speculative_num_draft_tokens = self.k + 1
        self.topk = 1
        self.tp_rank = get_parallel().tp_rank
        self.backend: Optional[SparseSpecAttnBackend] = None
        self.state: Optional[PillarState] = None
        # The configured schedule and the fallback, fallback first (it captures its graphs first).
        self.schedules: dict[str, Schedule] = {}

    @property
    def draft_worker(self) -> None:
        return None  # the target model drafts; there is no second model

    @property
    def schedule(self) -> Schedule:
        """The configured schedule (``--sparsespec-schedule``)."""
        return self.schedules[self.config.schedule]

    def alloc_memory_pool(self, **kwargs: Any) -> None:
        # The target pools do not exist yet when __init__ runs.
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
        mc = self.model_runner.model_config
        req_to_token = self.req_to_token_pool.req_to_token
        # This rank's heads: SGLang sizes the KV pool with get_num_kv_heads(attn_tp_size) and its
        # attention layers hold num_attention_heads // attn_tp_size query heads (attn_tp_size is
        # tp_size here: DP attention is refused). Selection tables and scores are per KV head,
        # the draft-lse ring per query head (tests/test_multi_gpu.py).
        self.state = PillarState(
            self.config, mc.num_hidden_layers, mc.get_num_attention_heads(get_parallel().attn_tp_size),
            self.model_runner.token_to_kv_pool.head_num, req_to_token,
            group_scores=schedule_class(self.config.schedule).group_scores(self.k, req_to_token.shape[0]),
        )

    def init_attention_backends(self) -> None:
        # Runs after the target runner built its backend and before CUDA graph
        # capture, so captured verify graphs take the PillarAttn path.
        super().init_attention_backends()
        backend = self.model_runner.attn_backend
        if not isinstance(backend, SparseSpecAttnBackend):
            raise ValueError("SPARSESPEC needs --attention-backend sparsespec, got "
                             f"{type(backend).__name__}")
        backend.attach(self.state)
        self.backend = backend
        dense_backend = None
        if self.config.dense_backend != "triton":
            # All-dense passes are plain decode forwards: a second SGLang backend runs them.
            dense_backend = ATTENTION_BACKENDS[self.config.dense_backend](self.model_runner)
            logger.info("SPARSESPEC: all-dense passes decode with SGLang's %s attention backend",
                        self.config.dense_backend)
        adaptive = self.config.adaptive == "on"
        tp_group = None
        if adaptive and get_parallel().tp_size > 1:
            group = get_tp_group()
            tp_group = TPGroup(group.cpu_group, group.first_rank, group.rank)
        ctx = ScheduleContext(k=self.k, state=self.state, backend=backend,
                              model_runner=self.model_runner, target_worker=self.target_worker,
                              sampling_backend=get_exec().kernel.sampling_backend,
                              delayed_verification=self.config.delayed_verification,
                              adaptive=adaptive, dense_backend=dense_backend, tp_group=tp_group)
        for name in dict.fromkeys((FALLBACK_SCHEDULE, self.config.schedule)):
            cls = schedule_class(name)
            # The configured schedule's phase times are the ones exported and profiled.
            profiler = (CycleProfiler.configured(cls.PHASES, self.config.profile, self.tp_rank, cls.VALUES)
                        if name == self.config.schedule else CycleProfiler(cls.PHASES, values=cls.VALUES))
            self.schedules[name] = cls(ctx, profiler)
        if get_observability().enable_metrics and self.tp_rank == 0:
            self.schedule.profiler.export_metrics({"model_name": str(get_serving().served_model_name)})

    def init_cuda_graphs(self) -> None:
        # The target runner captured the verify graphs; drafts need width-1 graphs. A unified
        # server captures the lockstep draft graphs too, for its fallback steps.
        super().init_cuda_graphs()
        target_graphs = self.model_runner.decode_cuda_graph_runner
        if target_graphs is None:
            return
        for schedule in self.schedules.values():
            schedule.capture_graphs(max(target_graphs.capture_bs))

    def update_weights_from_tensor(self, recv_req: Any):
        return self.target_worker.update_weights_from_tensor(recv_req)

    # ---- one scheduler step -------------------------------------------------

    def forward_batch_generation(self, batch: ScheduleBatch, on_publish=None,
                                 pp_proxy_tensors: Any = None) -> GenerationBatchResult:
        # pp_proxy_tensors: passed (None) by the non-overlap scheduler from 0.5.19; SPARSESPEC
        # refuses pipeline parallelism, so there is never a proxy to forward.
        fwd_stream = torch.get_device_module(self.device).current_stream()
        record_stream_for_v2_verify(batch, None, fwd_stream)
        if not batch.forward_mode.is_decode():
            return self._prefill(batch, on_publish)
        rows = [req_pool_row(req) for req in batch.reqs]
        schedule = self.schedule if self.schedule.handles(batch) else self.schedules[FALLBACK_SCHEDULE]
        step = schedule.step(batch, rows)
        for other in self.schedules.values():
            if other is not schedule:
                other.forget(rows)  # what they carry for these rows is stale after this step
        if on_publish is not None:
            on_publish(step.new_seq_lens)
        return self._result(step, next_token_ids=step.accept_tokens)

    def _prefill(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        bs = len(batch.reqs)
        result = self.target_worker.forward_batch_generation(batch)
        if batch.forward_mode.is_extend():
            # Chunked prefill re-runs this per chunk; the last chunk's window wins.
            self.state.init_window(batch.req_pool_indices, batch.seq_lens)
            rows = [req_pool_row(req) for req in batch.reqs]
            for schedule in self.schedules.values():
                schedule.forget(rows)
        if result.next_token_ids is not None:
            self.state.set_pending(batch.req_pool_indices, result.next_token_ids)
        new_seq_lens = batch.seq_lens.clone()
        accept_tokens = torch.zeros(bs, self.draft_token_num, dtype=torch.int32, device=self.device)
        accept_tokens[:, 0] = result.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        if on_publish is not None:
            on_publish(new_seq_lens)
        step = StepResult(accept_tokens.flatten(), accept_lens, new_seq_lens, result.logits_output,
                          result.can_run_cuda_graph)
        return self._result(step, next_token_ids=result.next_token_ids)

    def _result(self, step: StepResult, next_token_ids: torch.Tensor) -> GenerationBatchResult:
        next_draft_input = NgramVerifyInput(
            draft_token_num=self.draft_token_num, new_seq_lens=step.new_seq_lens,
            accept_tokens=step.accept_tokens, accept_lens=step.accept_lens,
        )
        return GenerationBatchResult(
            logits_output=step.logits_output, next_token_ids=next_token_ids,
            can_run_cuda_graph=step.can_run_cuda_graph, accept_lens=step.accept_lens,
            new_seq_lens=step.new_seq_lens, next_draft_input=next_draft_input,
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
        )
