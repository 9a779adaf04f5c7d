"""The lockstep schedule: one PillarAttn cycle over the whole batch per decode step.

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
from sparsespec_sglang.draft_graph import DraftGraphs, as_decode_rows
from sparsespec_sglang.pillar import ForwardPlan
from sparsespec_sglang.profiling import CycleProfiler
from sparsespec_sglang.schedule import ScheduleContext, StepResult


class LockstepSchedule:
    """k draft forwards of the whole batch, then one verify forward of the whole batch."""

    PHASES: ClassVar[tuple[str, ...]] = ("draft", "verify", "accept")

    def __init__(self, ctx: ScheduleContext, profiler: Optional[CycleProfiler] = None) -> None:
        self.ctx = ctx
        self.k, self.width = ctx.k, ctx.k + 1
        self.device = ctx.state.req_to_token.device
        self.profiler = profiler or CycleProfiler(phases=self.PHASES)
        self.graphs: Optional[DraftGraphs] = None

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
        step = self.ctx.state.draft_step
        self.graphs = DraftGraphs(self.ctx.model_runner, self.ctx.backend,
                                  lambda: self.ctx.backend.planned(ForwardPlan.sparse_draft(step)))

    def step(self, batch: Any) -> StepResult:
        ctx, state = self.ctx, self.ctx.state
        bs, width = len(batch.reqs), self.width
        rows = batch.req_pool_indices
        # The cycle starts from each request's last emitted token, kept by req_pool_idx on the
        # forward stream. Not from the relay in batch.spec_info: the scheduler filters and
        # merges that (retraction, joins) on its own stream while the previous cycle may still
        # be computing it (suspected cause of a device-side assert at the first retraction of
        # a B 128 H100 run; docs/results.md).
        pending = state.pending[rows]
        seq_lens = batch.seq_lens
        out_cache_loc = assign_extend_cache_locs_func(
            req_pool_indices=rows, req_to_token=state.req_to_token,
            start_offset=seq_lens, end_offset=seq_lens + width,
            batch_size=bs, draft_token_num=width, device=self.device,
        )

        self.profiler.begin()
        drafts = self._draft(batch, pending, out_cache_loc.view(bs, width))
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
        saved_mode = batch.forward_mode
        batch.forward_mode = ForwardMode.TARGET_VERIFY
        batch.input_ids = draft_tokens
        batch.out_cache_loc = out_cache_loc
        batch.spec_info = verify_input
        # No plan: a TARGET_VERIFY forward is the PillarAttn verify (SGLang captured its graphs).
        verify = ctx.target_worker.forward_batch_generation(batch, is_verify=True)
        logits_output = verify.logits_output
        self.profiler.mark("verify")

        accepted = accept(verify_input, batch, logits_output, ctx.sampling_backend,
                          grammar_tree=grammar_tree)
        # The verify window is the next cycle's dense tail; its accepted tokens are a prefix of
        # the verified chain, so their KV already sits in its final slots (no KV move: SGLang's
        # move_accept_tokens_to_target_kvcache cost ~4 ms per cycle at B 128 on the H100).
        state.commit(rows, window_start=seq_lens, last_tokens=accepted.last_tokens)
        if batch.return_logprob:
            compute_spec_logprobs(batch, logits_output, accepted.predict, accepted.accept_index)
        batch.forward_mode = saved_mode
        self.profiler.mark("accept")
        self.profiler.end_cycle(bs, accepted.lens)
        return StepResult(accepted.tokens.flatten(), accepted.lens, accepted.new_seq_lens,
                          logits_output, verify.can_run_cuda_graph)

    def _draft(self, batch: Any, pending: torch.Tensor, locs: torch.Tensor) -> torch.Tensor:
        """k sparse decode forwards of the target model; returns drafts [bs, k]."""
        ctx = self.ctx
        bs = len(batch.reqs)
        plan = ForwardPlan.sparse_draft(ctx.state.load_draft_step(batch.req_pool_indices))
        drafts = torch.empty((bs, self.k), dtype=torch.int64, device=self.device)
        token = pending.to(torch.int64)
        with as_decode_rows(batch) as saved:
            for j in range(self.k):
                batch.input_ids = token
                batch.out_cache_loc = locs[:, j].contiguous()
                batch.seq_lens = saved["seq_lens"] + (j + 1)
                batch.seq_lens_cpu = saved["seq_lens_cpu"] + (j + 1)
                batch.seq_lens_sum = None
                forward_batch = ForwardBatch.init_new(batch, ctx.model_runner,
                                                     return_hidden_states_before_norm=False)
                with ctx.backend.planned(plan):
                    if self.graphs is not None:
                        logits = self.graphs.run(forward_batch)
                    else:
                        logits = ctx.model_runner.forward(forward_batch).logits_output.next_token_logits
                token = torch.argmax(logits, dim=-1)
                drafts[:, j] = token
        return drafts
