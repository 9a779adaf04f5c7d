"""SparseSpecWorker: SGLang V2 speculative worker that drafts with the target model itself.

With ``--sparsespec-schedule unified`` (the default) a decode step is k + 1 passes that each mix
drafting and verifying requests (``unified.py``); batches that need per-token logprobs, a grammar
or hidden states run the lockstep cycle below instead. With ``lockstep`` (the default under
``--enable-deterministic-inference``), one call on a decode batch is one PillarAttn cycle (lockstep
over the batch):
k sparse draft forwards on the target model runner (DECODE, one token per
request, attention over the selected slots), then one full verify forward
(TARGET_VERIFY over the pending token + k drafts) whose attention also picks the
next selection. Acceptance, KV bookkeeping and logprobs reuse SGLang's spec-V2
helpers exactly as the NGRAM worker does, so the scheduler sees an NGRAM-shaped
algorithm (``SparseSpecAlgo.is_ngram()``): chain verify through
``NgramVerifyInput``, draft state relayed through ``batch.spec_info``.

Drafts are the argmax of the sparse model, i.e. a deterministic proposal, so
SGLang's target-only acceptance (``eagle_sample``, fed plain sampling's top-k/top-p/min-p
target distribution by ``sampling.sample_like_plain``) is exact speculative sampling
for temperature > 0 and exact prefix matching for greedy: output is lossless.

The draft slots are the verify slots: draft j writes KV at position
``seq_len + j``, which the verify pass then overwrites with full-attention KV,
so drafting needs no extra KV allocation and rejected slots are freed by
SGLang's usual spec-V2 path.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
from sglang.srt.layers.logprob_processor import compute_spec_v2_logprobs
from sglang.srt.managers.schedule_batch import ScheduleBatch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.spec_utils import (
    GrammarTree,
    build_grammar_vocab_mask,
    record_stream_for_v2_verify,
)

from sparsespec_sglang.attention import SparseSpecAttnBackend
from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.draft_graph import DraftGraphs, as_decode_rows
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.profiling import CycleProfiler
from sparsespec_sglang.sampling import sample_like_plain
from sparsespec_sglang.unified import UnifiedRunner, chain_tree

logger = logging.getLogger(__name__)


class SparseSpecWorker(BaseSpecWorker):
    def __init__(self, server_args: Any, gpu_id: int, ps: Any, nccl_port: int,
                 target_worker: Any) -> None:
        super().__init__()
        self.server_args = server_args
        self.config = SparseSpecConfig.from_server_args(server_args)
        self._target_worker = target_worker
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.k = self.config.num_draft_steps
        self.draft_token_num = self.k + 1
        self.speculative_num_steps = self.k
        self.speculative_num_draft_tokens = self.k + 1
        self.topk = 1
        self.backend: Optional[SparseSpecAttnBackend] = None
        self.state: Optional[PillarState] = None
        self.draft_graphs: Optional[DraftGraphs] = None
        self.unified: Optional[UnifiedRunner] = None
        tp_rank = getattr(self.model_runner.ps, "tp_rank", 0)
        self.profiler = CycleProfiler.from_env(tp_rank)
        if getattr(server_args, "enable_metrics", False) and tp_rank == 0:
            self.profiler.export_metrics({"model_name": str(server_args.served_model_name)})

    @property
    def draft_worker(self) -> None:
        return None  # the target model drafts; there is no second model

    def alloc_memory_pool(self, **kwargs: Any) -> None:
        # The target pools do not exist yet when __init__ runs.
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self._target_worker.get_memory_pool()
        mc = self.model_runner.model_config
        self.state = PillarState(
            self.config, mc.num_hidden_layers, mc.get_num_attention_heads(self.server_args.tp_size),
            self.model_runner.token_to_kv_pool.head_num, self.req_to_token_pool.req_to_token,
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
        if self.config.schedule == "unified":
            self.unified = UnifiedRunner(
                self.k, self.state, backend, self.model_runner,
                lambda verify_input, batch, logits_output: sample_like_plain(
                    verify_input, batch, logits_output, None, self.server_args.sampling_backend),
                self.config.delayed_verification)

    def init_cuda_graphs(self) -> None:
        # The target runner captured the verify graphs; drafts need width-1 graphs.
        super().init_cuda_graphs()
        target_graphs = self.model_runner.decode_cuda_graph_runner
        if target_graphs is None:
            return
        # Unified servers keep the draft graphs too: their lockstep steps (batches with logprobs,
        # a grammar or hidden states) would otherwise draft eagerly.
        self.draft_graphs = DraftGraphs(self.model_runner, self.backend,
                                        lambda: self.backend.draft_step(self.state.draft_step))
        if self.unified is not None:
            sizes = UnifiedRunner.capture_sizes(max(target_graphs.capture_bs))
            self.unified.graphs = DraftGraphs(
                self.model_runner, self.backend, lambda: self.backend.mixed_pass(self.unified.rows),
                capture_sizes=sizes, label="unified-pass")

    def update_weights_from_tensor(self, recv_req: Any):
        return self.target_worker.update_weights_from_tensor(recv_req)

    # ---- one scheduler step -------------------------------------------------

    def forward_batch_generation(self, batch: ScheduleBatch, on_publish=None) -> GenerationBatchResult:
        fwd_stream = torch.get_device_module(self.device).current_stream()
        record_stream_for_v2_verify(batch, None, fwd_stream)
        if batch.forward_mode.is_decode():
            if self.unified is not None:
                if batch.reqs and not (batch.return_logprob or batch.has_grammar
                                       or getattr(batch, "return_hidden_states", False)):
                    return self._unified_step(batch, on_publish)
                self.unified.forget([req.req_pool_idx for req in batch.reqs])
            return self._cycle(batch, on_publish)
        return self._prefill(batch, on_publish)

    def _unified_step(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        self.profiler.mark()
        tokens, accept_lens, new_seq_lens, logits_output = self.unified.step(batch)
        # Drafting and verifying share every pass: the whole step counts as "draft" time.
        self.profiler.mark()
        self.profiler.mark()
        if on_publish is not None:
            on_publish(new_seq_lens)
        self.profiler.mark()
        self.profiler.end_cycle(len(batch.reqs), accept_lens)
        return self._result(logits_output, tokens, self.unified.graphs is not None, tokens,
                            accept_lens, new_seq_lens)

    def _prefill(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        bs = len(batch.reqs)
        result = self.target_worker.forward_batch_generation(batch)
        if batch.forward_mode.is_extend():
            # Chunked prefill re-runs this per chunk; the last chunk's window wins.
            self.state.init_window(batch.req_pool_indices, batch.seq_lens)
            if self.unified is not None:
                self.unified.forget([req.req_pool_idx for req in batch.reqs])
        if result.next_token_ids is not None:
            self.state.pending[batch.req_pool_indices] = result.next_token_ids.to(torch.int64)
        new_seq_lens = batch.seq_lens.clone()
        accept_tokens = torch.zeros(bs, self.draft_token_num, dtype=torch.int32, device=self.device)
        accept_tokens[:, 0] = result.next_token_ids
        accept_lens = torch.ones(bs, dtype=torch.int32, device=self.device)
        if on_publish is not None:
            on_publish(new_seq_lens)
        return self._result(result.logits_output, result.next_token_ids, result.can_run_cuda_graph,
                            accept_tokens.flatten(), accept_lens, new_seq_lens)

    def _cycle(self, batch: ScheduleBatch, on_publish) -> GenerationBatchResult:
        bs = len(batch.reqs)
        width = self.draft_token_num
        # The cycle starts from each request's last emitted token, kept by req_pool_idx on the
        # forward stream. Not from the relay in batch.spec_info: the scheduler filters and
        # merges that (retraction, joins) on its own stream while the previous cycle may still
        # be computing it (suspected cause of a device-side assert at the first retraction of
        # a B 128 H100 run; docs/results.md).
        pending = self.state.pending[batch.req_pool_indices]
        seq_lens = batch.seq_lens
        out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=batch.req_pool_indices,
            req_to_token=batch.req_to_token_pool.req_to_token,
            start_offset=seq_lens, end_offset=seq_lens + width,
            batch_size=bs, draft_token_num=width, device=self.device,
        )

        self.profiler.mark()
        drafts = self._draft(batch, pending, out_cache_loc.view(bs, width))
        self.profiler.mark()

        # Verify: [pending, d_1..d_k] at positions seq_len .. seq_len+k, full attention.
        draft_tokens = torch.cat([pending.unsqueeze(1).to(drafts.dtype), drafts], dim=1).flatten()
        positions = (seq_lens.unsqueeze(1) + torch.arange(width, device=self.device)).flatten()
        retrieve_index, next_token, next_sibling = chain_tree(bs, width, self.device)
        # No tree mask: the PillarAttn verify kernel is causal over the chain.
        # (NgramVerifyInput takes its device from new_seq_lens when there is no mask.)
        verify_input = NgramVerifyInput(
            draft_token=draft_tokens, custom_mask=None, positions=positions,
            retrieve_index=retrieve_index, retrieve_next_token=next_token,
            retrieve_next_sibling=next_sibling, draft_token_num=width, new_seq_lens=seq_lens,
        )
        # Constrained decoding: the drafts ignore the grammar, the verify must not.
        # (Copy the chain to the host before the verify launch, as SGLang's chain
        # verifiers do; the scheduler advances the grammar after acceptance.)
        grammar_tree = (GrammarTree.from_linear_chain(draft_tokens.view(bs, width))
                        if batch.has_grammar else None)
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = draft_tokens
        batch.out_cache_loc = out_cache_loc
        batch.spec_info = verify_input
        # The drafts' dense tail starts at this verify window for the next cycle.
        self.state.dense_start[batch.req_pool_indices] = seq_lens.to(torch.int32)
        verify = self.target_worker.forward_batch_generation(batch, is_verify=True)
        logits_output = verify.logits_output
        self.profiler.mark()

        grammar_mask = None
        if grammar_tree is not None:
            grammar_mask = build_grammar_vocab_mask(
                reqs=batch.reqs, tree=grammar_tree, sampling_info=batch.sampling_info,
                device=self.device, barrier=None)
        predict, accept_lens, accept_index = sample_like_plain(
            verify_input, batch, logits_output, grammar_mask, self.server_args.sampling_backend)
        new_seq_lens = seq_lens + accept_lens
        accept_tokens = predict[accept_index].flatten()
        self.state.pending[batch.req_pool_indices] = accept_tokens.view(bs, width)[
            torch.arange(bs, device=self.device), accept_lens.long() - 1].to(torch.int64)
        # No KV move (SGLang's move_accept_tokens_to_target_kvcache): the verify chain is
        # written at positions seq_len .. seq_len + k and the accepted tokens are its prefix,
        # so every accepted token's KV already sits in its final slot (H100 trace: the
        # all-layer copy cost ~4 ms per cycle at B 128 for nothing).
        if batch.return_logprob:
            compute_spec_v2_logprobs(batch, logits_output, predict, accept_index, width - 1)
        if on_publish is not None:
            on_publish(new_seq_lens)
        batch.forward_mode = ForwardMode.DECODE
        self.profiler.mark()
        self.profiler.end_cycle(bs, accept_lens)
        return self._result(logits_output, accept_tokens, verify.can_run_cuda_graph,
                            accept_tokens, accept_lens, new_seq_lens)

    def _draft(self, batch: ScheduleBatch, pending: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
        """k sparse decode forwards of the target model; returns drafts [bs, k]."""
        bs = len(batch.reqs)
        step = self.state.load_draft_step(batch.req_pool_indices)
        drafts = torch.empty((bs, self.k), dtype=torch.int64, device=self.device)
        token = pending.to(torch.int64)
        with as_decode_rows(batch) as saved, self.backend.draft_step(step):
            for j in range(self.k):
                batch.input_ids = token
                batch.out_cache_loc = locs[:, j].contiguous()
                batch.seq_lens = saved["seq_lens"] + (j + 1)
                batch.seq_lens_cpu = saved["seq_lens_cpu"] + (j + 1)
                batch.seq_lens_sum = None
                forward_batch = ForwardBatch.init_new(batch, self.model_runner,
                                                     return_hidden_states_before_norm=False)
                if self.draft_graphs is not None:
                    logits = self.draft_graphs.run(forward_batch)
                else:
                    logits = self.model_runner.forward(forward_batch).logits_output.next_token_logits
                token = torch.argmax(logits, dim=-1)
                drafts[:, j] = token
        return drafts

    def _result(self, logits_output, next_token_ids, can_run_cuda_graph, accept_tokens,
                accept_lens, new_seq_lens) -> GenerationBatchResult:
        next_draft_input = NgramVerifyInput(
            draft_token_num=self.draft_token_num, new_seq_lens=new_seq_lens,
            accept_tokens=accept_tokens, accept_lens=accept_lens,
        )
        return GenerationBatchResult(
            logits_output=logits_output, next_token_ids=next_token_ids,
            can_run_cuda_graph=can_run_cuda_graph, accept_lens=accept_lens,
            new_seq_lens=new_seq_lens, next_draft_input=next_draft_input,
            speculative_num_draft_tokens=self.speculative_num_draft_tokens,
        )

