"""The lockstep schedule: k sparse drafts and one verify of the whole batch per decode step.

k sparse draft forwards on the target model runner (DECODE, one token per request, attention over
the selected slots), then one full verify forward (TARGET_VERIFY over the pending token + k
drafts) whose attention also picks the next selection. The deterministic default
(``--enable-deterministic-inference``: the verify then runs SGLang's deterministic decode kernel)
and the fallback of a unified server for batches that need per-token logprobs, a grammar or
hidden states: acceptance, logprobs and grammar masks reuse SGLang's spec-v2 helpers exactly as
the NGRAM worker does (chain verify through ``NgramVerifyInput``).

The draft slots are the verify slots: draft j writes KV at position ``seq_len + j``, which the
verify then overwrites with full-attention KV, so drafting needs no extra KV and the accepted
tokens' KV already sits in its final slots (no KV move).
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from sparsespec_sglang.compat import (
    ForwardBatch,
    ForwardMode,
    GrammarTree,
    assign_extend_cache_locs_func,
    compute_spec_logprobs,
)

from sparsespec_sglang.acceptance import accept, verify_chains
from sparsespec_sglang.forward_graphs import ForwardGraphs
from sparsespec_sglang.forward_plan import DraftStep, ForwardPlan
from sparsespec_sglang.profiling import CycleProfiler
from sparsespec_sglang.schedule import ScheduleContext, StepResult, borrowed


class LockstepSchedule:
    """k draft forwards of the whole batch, then one verify forward of the whole batch."""

    PHASES: ClassVar[tuple[str, ...]] = ("draft", "verify", "accept")
    VALUES: ClassVar[tuple[str, ...]] = ()  # per-step values beside the phase times: none

    def __init__(self, ctx: ScheduleContext, profiler: Optional[CycleProfiler] = None) -> None:
        self.ctx = ctx
        self.k, self.width = ctx.k, ctx.k + 1
        self.device = ctx.state.req_to_token.device
        self.profiler = profiler or CycleProfiler(phases=self.PHASES)
        # The drafts' per-request inputs in batch order (static: the draft graphs read them).
        self.draft_step = DraftStep.allocate(ctx.state.req_to_token.shape[0], self.device)
        self.plan = ForwardPlan.sparse_draft(self.draft_step)
        self.graphs = ForwardGraphs(ctx.model_runner, ctx.backend, label="draft")

    @classmethod
    def kv_reserve_per_decode(cls, k: int) -> Optional[int]:
        return None  # writes k + 1 positions past the committed length: SGLang's 2 (k + 1) covers it

    @classmethod
    def group_scores(cls, k: int, num_rows: int) -> Optional[tuple[int, int]]:
        return None  # every verify selects layer by layer

    def handles(self, batch: Any) -> bool:
        return True

    def forget(self, pool_rows: list[int]) -> None:
        """Nothing to drop: a lockstep step starts from the committed state alone."""

    def capture_graphs(self, max_batch_size: int) -> None:
        self.graphs.capture(self.plan)

    def step(self, batch: Any, rows: list[int]) -> StepResult:
        ctx, state = self.ctx, self.ctx.state
        bs, width = len(batch.reqs), self.width
        pool = batch.req_pool_indices
        # The step starts from each request's last emitted token, kept by req_pool_idx on the
        # forward stream. Not from the relay in batch.spec_info: the scheduler filters and
        # merges that (retraction, joins) on its own stream while the previous step may still
        # be computing it (suspected cause of a device-side assert at the first retraction of
        # a B 128 H100 run; docs/results.md).
        pending = state.pending[pool]
        seq_lens = batch.seq_lens
        out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=pool, req_to_token=state.req_to_token,
            start_offset=seq_lens, end_offset=seq_lens + width,
            batch_size=bs, draft_token_num=width, device=self.device,
        )

        self.profiler.begin()
        with borrowed(batch) as saved:
            drafts = self._draft(batch, saved, pending, out_cache_loc.view(bs, width))
        self.profiler.mark("draft")

        # Verify: [pending, d_1..d_k] at positions seq_len .. seq_len+k, full attention.
        draft_tokens = torch.cat([pending.unsqueeze(1).to(drafts.dtype), drafts], dim=1).flatten()
        positions = (seq_lens.unsqueeze(1) + torch.arange(width, device=self.device)).flatten()
        verify_input = verify_chains(draft_tokens, positions, seq_lens, width)
        # Constrained decoding: the drafts ignore the grammar, the verify must not. Copy the
        # chain to the host before the verify launch, as SGLang's chain verifiers do; the
        # scheduler advances the grammar after acceptance.
        grammar_tree = (GrammarTree.from_linear_chain(draft_tokens.view(bs, width))
                        if batch.has_grammar else None)
        with borrowed(batch):
            batch.forward_mode = ForwardMode.TARGET_VERIFY
            batch.input_ids = draft_tokens
            batch.out_cache_loc = out_cache_loc
            # SGLang's own verify forward (its verify input, its captured verify graphs): the
            # backend takes the PillarAttn verify for a TARGET_VERIFY forward.
            batch.spec_info = verify_input
            verify = ctx.target_worker.forward_batch_generation(batch, is_verify=True)
            logits_output = verify.logits_output
            self.profiler.mark("verify")

            accepted = accept(verify_input, batch, logits_output, ctx.sampling_backend,
                              grammar_tree=grammar_tree)
            # The verify window is the next step's dense tail; its accepted tokens are a prefix
            # of the verified chain, so their KV already sits in its final slots (no KV move:
            # SGLang's move_accept_tokens_to_target_kvcache cost ~4 ms per step at B 128 on the
            # H100).
            state.commit(pool, window_start=seq_lens, last_tokens=accepted.last_tokens)
            if batch.return_logprob:
                compute_spec_logprobs(batch, logits_output, accepted.predict, accepted.accept_index)
        self.profiler.mark("accept")
        self.profiler.end_cycle(bs, accepted.lens)
        return StepResult(accepted.tokens.flatten(), accepted.lens, accepted.new_seq_lens,
                          logits_output, verify.can_run_cuda_graph)

    def _draft(self, batch: Any, saved: dict[str, Any], pending: torch.Tensor,
               locs: torch.Tensor) -> torch.Tensor:
        """k sparse decode forwards of the target model on the borrowed batch; drafts [bs, k]."""
        ctx = self.ctx
        bs = len(batch.reqs)
        self.draft_step.load(batch.req_pool_indices, ctx.state.dense_start, ctx.state.sel_lens)
        drafts = torch.empty((bs, self.k), dtype=torch.int64, device=self.device)
        token = pending.to(torch.int64)
        batch.forward_mode = ForwardMode.DECODE
        batch.return_logprob = False
        batch.spec_info = self.plan
        for j in range(self.k):
            batch.input_ids = token
            batch.out_cache_loc = locs[:, j].contiguous()
            batch.seq_lens = saved["seq_lens"] + (j + 1)
            batch.seq_lens_cpu = saved["seq_lens_cpu"] + (j + 1)
            batch.seq_lens_sum = None
            forward_batch = ForwardBatch.init_new(batch, ctx.model_runner,
                                                 return_hidden_states_before_norm=False)
            token = torch.argmax(self.graphs.run(forward_batch), dim=-1)
            drafts[:, j] = token
        return drafts
