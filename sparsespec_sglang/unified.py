"""Unified draft/verify passes (paper section 4.2) inside SGLang's speculative scheduler.

Lockstep runs k draft passes of B tokens and then one verify pass of B (k + 1) tokens. Here one
scheduler step is k + 1 passes, and every pass mixes both kinds of work in one DECODE forward
whose rows are single tokens: the requests whose phase offset (``PhasePlanner``, step-aligned)
comes up verify their pending token + drafts (rows of the verify kernel with the score dump and
top-K), every other request drafts one token (a sparse decode row). So each pass carries a flat
~B + k B / (k + 1) tokens, and every request still verifies exactly once per step: SGLang sees
the result shape it expects (1..k + 1 accepted tokens per request).

Nothing waits for the host: a verify's acceptance runs on the GPU right after its pass and writes
the request's next input token, committed length and dense start there, where the next pass's
inputs are gathered from (the host plans passes from the phase offsets alone). That is what
delayed verification buys in the paper (the host never stalls on a verify result); here no
request has to sit a pass out either. ``--sparsespec-disable-delayed-verify`` makes the host
wait for every pass's results instead, to measure what that costs.

State across steps, by request-pool row: ``PillarState.pending`` / ``dense_start`` / selection
(changed only through ``PillarState.commit`` and the verify's top-K), and this schedule's own
``drafts`` (tokens drafted since the last verify, which may cross a step boundary; their
KV positions are covered by patches/kv_reserve.py, sized by :meth:`UnifiedSchedule.kv_reserve_per_decode`).
Discarding drafts is always safe (they are only proposals), which is how a request re-enters
after a prefill or a lockstep step (:meth:`UnifiedSchedule.forget`).
"""

from __future__ import annotations

import collections
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from sparsespec_sglang.compat import ForwardBatch, ForwardMode, LogitsProcessorOutput

from sparsespec_sglang.acceptance import accept, verify_chains
from sparsespec_sglang.forward_graphs import ForwardGraphs
from sparsespec_sglang.forward_plan import ForwardPlan, MixedRows
from sparsespec_sglang.phases import PassRoles, PhasePlanner
from sparsespec_sglang.profiling import CycleProfiler, PassTimer
from sparsespec_sglang.schedule import ScheduleContext, StepResult, borrowed
from sparsespec_sglang.selection import TOPK_LAYER_GROUP

logger = logging.getLogger(__name__)

LOG_EVERY = 200  # steps between pass-size log lines


@dataclass
class PassLayout:
    """Host-side layout of one pass, in the order of its rows."""

    row_batch: list[int]  # batch index of every row
    row_index: list[int]  # draft index within the request's chain (the row's position offset)
    num_draft: int  # rows [0, num_draft) draft, the rest are verify chains
    verify_batch: list[int]  # batch index of every verifying request
    verify_lens: list[int]  # its chain length (drafts + 1)

    @classmethod
    def of(cls, roles: PassRoles, batch_pos: dict[int, int]) -> "PassLayout":
        row_batch = [batch_pos[r] for r in roles.draft]
        row_index = list(roles.draft.values())
        verify_batch = [batch_pos[r] for r in roles.verify]
        verify_lens = [d + 1 for d in roles.verify.values()]
        for b, n in zip(verify_batch, verify_lens):
            row_batch += [b] * n
            row_index += range(n)
        return cls(row_batch, row_index, len(roles.draft), verify_batch, verify_lens)

    @property
    def num_rows(self) -> int:
        return len(self.row_batch)

    def qo_indptr(self) -> list[int]:
        out = [self.num_draft]
        for n in self.verify_lens:
            out.append(out[-1] + n)
        return out

    def chain_gather(self, width: int) -> list[int]:
        """Row of chain node j of verifying request v, at [v * width + j] (the last real node
        repeated past a short chain), so the verify logits take SGLang's uniform layout."""
        qo = self.qo_indptr()
        return [qo[v] + min(j, n - 1) for v, n in enumerate(self.verify_lens) for j in range(width)]

    def chain_next(self, width: int) -> list[int]:
        """``retrieve_next_token`` of every chain: node j -> j + 1, -1 at its real end."""
        return [j + 1 if j + 1 < n else -1 for n in self.verify_lens for j in range(width)]


class UnifiedSchedule:
    """One scheduler step as k + 1 unified passes."""

    PHASES: ClassVar[tuple[str, ...]] = ("inputs", "forward", "accept")

    def __init__(self, ctx: ScheduleContext, profiler: Optional[CycleProfiler] = None) -> None:
        self.ctx = ctx
        self.k, self.width = ctx.k, ctx.k + 1
        self.state, self.backend, self.model_runner = ctx.state, ctx.backend, ctx.model_runner
        self.delayed_verification = ctx.delayed_verification
        self.profiler = profiler or CycleProfiler(phases=self.PHASES)
        self.graphs = ForwardGraphs(ctx.model_runner, ctx.backend, label="unified-pass")
        self.device = ctx.state.req_to_token.device
        num_rows = ctx.state.req_to_token.shape[0]
        self.planner = PhasePlanner(self.k)
        self.drafts = torch.zeros((num_rows, self.k), dtype=torch.int64, device=self.device)
        self.rows = MixedRows.allocate(self.width, num_rows * self.width, self.device)
        self.steps = 0
        self.pass_tokens: list[tuple[int, int, bool]] = []  # (requests, tokens, steady) per pass since the last log
        self.timer = PassTimer()
        self._moved = False  # the planner moved requests between offsets at the last step's end

    @classmethod
    def kv_reserve_per_decode(cls, k: int) -> Optional[int]:
        # A request verifies in one of the k + 1 passes and drafts in the later ones: up to
        # 2k + 1 positions past the step's committed length, 3 (k + 1) with the overlap
        # scheduler's one-verify lag of the committed length.
        return 3 * (k + 1)

    @classmethod
    def group_scores(cls, k: int, num_rows: int) -> Optional[tuple[int, int]]:
        # A full pass verifies ~R / (k + 1) requests; twice that covers the planner's imbalance
        # and the spare entries of the largest graph (capture_sizes: up to 2 R + 16 rows).
        return TOPK_LAYER_GROUP, min(64, 2 * -(-num_rows // (k + 1)) + 2)

    @staticmethod
    def capture_sizes(max_requests: int) -> list[int]:
        """Row counts to capture: a full pass has B + k B / (k + 1) < 2 B rows."""
        return sorted({1, 2, 4, 8} | set(range(16, 2 * max_requests + 16, 16)))

    def capture_graphs(self, max_batch_size: int) -> None:
        # Captured with empty verify entries: every entry a bucket has room for runs (num_verify None).
        self.graphs.capture(ForwardPlan.unified_pass(self.rows), self.capture_sizes(max_batch_size))

    def handles(self, batch: Any) -> bool:
        """Batches that need per-token logprobs, a grammar or hidden states run lockstep: those
        SGLang helpers expect one verify forward of the whole batch."""
        return bool(batch.reqs) and not (batch.return_logprob or batch.has_grammar
                                         or getattr(batch, "return_hidden_states", False))

    def forget(self, pool_rows: list[int]) -> None:
        """These rows start over (a prefill, or a lockstep step verified them): no drafts."""
        for row in pool_rows:
            if row in self.planner.offset:
                self.planner.release(row)

    def step(self, batch: Any, rows: list[int]) -> StepResult:
        """k + 1 passes; every request of the batch verifies in exactly one of them."""
        self.timer.begin_step()
        self.profiler.begin()
        batch_pos = {row: i for i, row in enumerate(rows)}
        left = [r for r in self.planner.offset if r not in batch_pos]
        for row in left:
            self.planner.release(row)  # finished, aborted or retracted
        joined = [row for row in rows if row not in self.planner.offset]
        for row in joined:
            self.planner.admit(row)
        moves = self.planner.shortened_cycles
        layouts = [PassLayout.of(self.planner.next_pass(), batch_pos) for _ in range(self.width)]
        # A step's passes are steady unless requests joined or left, or the previous step's
        # last pass moved requests between offsets (their next cycle is a short one).
        steady = not (left or joined or self._moved)
        self._moved = self.planner.shortened_cycles != moves

        bs, w = len(rows), self.width
        committed = batch.seq_lens.clone()
        tokens = torch.zeros((bs, w), dtype=torch.int32, device=self.device)
        lens = torch.zeros((bs,), dtype=torch.int32, device=self.device)
        host, offsets = _pack(layouts, w)
        indices = torch.tensor(host, dtype=torch.int64).to(self.device, non_blocking=True)
        logits_output = None
        with borrowed(batch) as saved:
            batch.forward_mode = ForwardMode.DECODE
            batch.return_logprob = False
            for layout, where in zip(layouts, offsets):
                logits_output = self._pass(batch, saved, layout, indices, where, committed,
                                           tokens, lens)
                if not self.delayed_verification and layout.verify_batch:
                    t0 = time.perf_counter()
                    torch.get_device_module(self.device).current_stream().synchronize()
                    self.timer.waited(time.perf_counter() - t0)
            self.timer.end_step(len(layouts))
            self.profiler.end_cycle(bs, lens)
        self.pass_tokens += [(bs, layout.num_rows, steady) for layout in layouts]
        self.steps += 1
        if self.steps % LOG_EVERY == 0:
            self._log()
        return StepResult(tokens.flatten(), lens, committed, logits_output, self.graphs.captured)

    def _pass(self, batch: Any, saved: dict[str, Any], layout: PassLayout, indices: torch.Tensor,
              where: dict[str, slice], committed: torch.Tensor, tokens: torch.Tensor,
              lens: torch.Tensor) -> Any:
        """One pass on the borrowed batch: its rows' inputs, one forward, the verifies' acceptance.
        ``indices`` holds every pass's index arrays on the device, this pass's at ``where``."""
        state, w = self.state, self.width
        req_pool_indices, seq_lens_cpu = saved["req_pool_indices"], saved["seq_lens_cpu"]
        t, d, nv = layout.num_rows, layout.num_draft, len(layout.verify_batch)
        row_batch, row_index = indices[where["row_batch"]], indices[where["row_index"]]
        pool = req_pool_indices[row_batch]
        pos = committed[row_batch] + row_index
        prev = self.drafts[pool, (row_index - 1).clamp(min=0)]
        input_ids = torch.where(row_index == 0, state.pending[pool], prev)
        seq_lens = pos + 1
        verify_batch = indices[where["verify_batch"]]
        verify_pool, verify_prefix = req_pool_indices[verify_batch], committed[verify_batch]
        verify_lens = indices[where["verify_lens"]].to(torch.int32)
        plan = self.rows.fill(
            is_verify=torch.arange(t, device=self.device) >= d, pool=pool, seq_lens=seq_lens,
            dense_start=state.dense_start[pool], sel_lens=state.sel_lens[pool],
            qo_indptr=indices[where["qo_indptr"]], verify_pool=verify_pool,
            verify_prefix=verify_prefix, verify_lens=verify_lens)

        batch.input_ids = input_ids
        batch.req_pool_indices = pool
        batch.out_cache_loc = state.req_to_token[pool, pos].to(torch.int64)
        batch.seq_lens = seq_lens
        batch.seq_lens_cpu = (seq_lens_cpu[layout.row_batch]
                              + torch.tensor(layout.row_index, dtype=seq_lens_cpu.dtype) + 1)
        batch.seq_lens_sum = None
        batch.spec_info = plan
        forward_batch = ForwardBatch.init_new(batch, self.model_runner,
                                              return_hidden_states_before_norm=False)
        self.profiler.mark("inputs")
        self.timer.forward_start()
        logits = self.graphs.run(forward_batch)
        self.timer.forward_end()
        self.profiler.mark("forward")

        if d:
            self.drafts[pool[:d], row_index[:d]] = torch.argmax(logits[:d], dim=-1)
        if not nv:
            self.profiler.mark("accept")
            return LogitsProcessorOutput(next_token_logits=logits)
        if all(n == w for n in layout.verify_lens):
            chain_rows = slice(d, t)
        else:
            chain_rows = indices[where["chain_gather"]]
        verify_logits = LogitsProcessorOutput(next_token_logits=logits[chain_rows])
        verify_input = verify_chains(input_ids[chain_rows], pos[chain_rows], verify_prefix, w,
                                     next_token=indices[where["chain_next"]].view(nv, w))
        accepted = accept(verify_input, batch, verify_logits, self.ctx.sampling_backend,
                          requests=verify_batch, chain_lens=verify_lens)
        state.commit(verify_pool, window_start=verify_prefix, last_tokens=accepted.last_tokens)
        committed[verify_batch] = accepted.new_seq_lens
        tokens[verify_batch] = accepted.tokens
        lens[verify_batch] = accepted.lens
        self.profiler.mark("accept")
        return verify_logits

    def _log(self) -> None:
        """Pass sizes: over all passes, and over the steady passes (no join, leave or offset move)
        of the largest batch seen, the max/min ratio (a flat pass size is what unified passes are for);
        and the pass timing."""
        passes = [p for p in self.pass_tokens if p[1]]
        self.pass_tokens = []
        if not passes:
            return
        sizes = [n for _, n, _ in passes]
        full_batch = max(b for b, _, _ in passes)
        steady = [n for b, n, ok in passes if b == full_batch and ok]
        common = dict(collections.Counter(steady).most_common(4))
        full = (f"{len(steady)} steady passes of the full batch ({full_batch} requests): min "
                f"{min(steady)}, max {max(steady)}, max/min {max(steady) / min(steady):.2f}, "
                f"most common {common}"
                if steady else f"no steady pass of the full batch ({full_batch} requests)")
        logger.info(
            "SPARSESPEC unified: %d steps, tokens per pass mean %.1f, min %d, max %d over %d passes; "
            "%s; %d of all passes from CUDA graphs; timing %s",
            self.steps, sum(sizes) / len(sizes), min(sizes), max(sizes), len(sizes), full,
            self.graphs.replays, json.dumps({k: round(v, 3) for k, v in self.timer.summary().items()}))
        self.timer.reset()


def _pack(layouts: list[PassLayout], width: int) -> tuple[list[int], list[dict[str, slice]]]:
    """All passes' index arrays in one host list (one host-to-device copy per step)."""
    flat: list[int] = []
    offsets = []
    for layout in layouts:
        parts = {"row_batch": layout.row_batch, "row_index": layout.row_index,
                 "verify_batch": layout.verify_batch, "verify_lens": layout.verify_lens,
                 "qo_indptr": layout.qo_indptr(), "chain_gather": layout.chain_gather(width),
                 "chain_next": layout.chain_next(width)}
        where = {}
        for name, values in parts.items():
            where[name] = slice(len(flat), len(flat) + len(values))
            flat += values
        offsets.append(where)
    return flat, offsets
