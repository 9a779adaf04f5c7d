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

Adaptive speculation (``--sparsespec-adaptive on``): once per step an :class:`AdaptivePolicy`
(``adaptive.py``) decides which requests speculate; the others are *dense rows*, a plain decode
step of their request in each of the step's k + 1 passes: the sparse decode over their whole
context (``PillarState.stop_speculating``: no selection, dense from position 0), one exact token
per pass, accepted as a chain of length 1 (``acceptance.accept``, the request's own sampling
parameters: a plain decode step's sample), no score dump and no top-K. A dense request has no
phase; it leaves the planner when it stops speculating and joins it again, with the first-step
window at its committed length (``PillarState.start_speculating``), when it starts, both at a
step boundary. A step whose requests are all dense carries no plan: its passes are SGLang's own
decode forwards. The policy learns from what the GPU measured, read once the GPU is past it
(never a wait): each pass's forward time with its KV tokens and rows, and each speculating
request's accepted drafts.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from sparsespec_sglang.compat import ForwardBatch, ForwardMode, LogitsProcessorOutput

from sparsespec_sglang.acceptance import accept, verify_chains
from sparsespec_sglang.adaptive import AdaptivePolicy, PassCost, PassCostFit
from sparsespec_sglang.forward_graphs import ForwardGraphs
from sparsespec_sglang.forward_plan import ForwardPlan, MixedRows
from sparsespec_sglang.phases import PassRoles, PhasePlanner
from sparsespec_sglang.profiling import CycleProfiler, PassTimer
from sparsespec_sglang.schedule import ScheduleContext, StepResult, borrowed
from sparsespec_sglang.selection import TOPK_LAYER_GROUP

logger = logging.getLogger(__name__)

LOG_EVERY = 200  # steps between pass-size log lines
# The pass-cost prior errs toward dense rows: the HBM bandwidth an H100 peaks at (the KV and
# weight terms are no larger than this makes them) and a low compute rate for the per-row term.
PRIOR_BANDWIDTH = 3.35e12  # bytes/s
PRIOR_FLOPS = 4e14  # per second, for the 2 FLOPs per weight a row costs
# What a planned pass costs over a plain decode forward before any is measured: the unified
# schedule's host time and gaps measured ~1.2 ms per pass above lockstep's (8B shape, B 128, H100;
# docs/performance.md). Refitted online.
PRIOR_PLAN_SECONDS = 1.2e-3


@dataclass
class PassLayout:
    """Host-side layout of one pass, in the order of its rows: drafting requests, dense requests
    (adaptive speculation), then the verify chains."""

    row_batch: list[int]  # batch index of every row
    row_index: list[int]  # position offset from the request's committed length: drafts made
    # since its last verify (a dense row: the pass's index, its committed length is the step's)
    num_draft: int  # rows [0, num_draft) take the sparse decode (drafts and dense rows), the rest are verify chains
    verify_batch: list[int]  # batch index of every verifying request
    verify_lens: list[int]  # its chain length (drafts + 1)
    num_drafting: int  # rows [0, num_drafting) draft, [num_drafting, num_draft) are dense

    @classmethod
    def of(cls, roles: PassRoles, batch_pos: dict[int, int], dense: Sequence[int] = (),
           pass_index: int = 0) -> "PassLayout":
        """``dense``: the batch indices of the dense requests, ``pass_index``: this pass's index
        in the step."""
        row_batch = [batch_pos[r] for r in roles.draft] + list(dense)
        row_index = list(roles.draft.values()) + [pass_index] * len(dense)
        verify_batch = [batch_pos[r] for r in roles.verify]
        verify_lens = [d + 1 for d in roles.verify.values()]
        for b, n in zip(verify_batch, verify_lens):
            row_batch += [b] * n
            row_index += range(n)
        return cls(row_batch, row_index, len(roles.draft) + len(dense), verify_batch, verify_lens,
                   len(roles.draft))

    @property
    def num_rows(self) -> int:
        return len(self.row_batch)

    @property
    def planned(self) -> bool:
        """Whether the pass carries a plan (draft or verify rows); an all-dense pass is SGLang's
        own decode forward."""
        return self.num_drafting > 0 or bool(self.verify_batch)

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
    # Per-step shares exported beside the phase times: of the step's requests, and of the tokens
    # it emitted, those of speculating requests (1 without adaptive speculation).
    VALUES: ClassVar[tuple[str, ...]] = ("speculating_requests_share", "speculating_tokens_share")

    def __init__(self, ctx: ScheduleContext, profiler: Optional[CycleProfiler] = None) -> None:
        self.ctx = ctx
        self.k, self.width = ctx.k, ctx.k + 1
        self.state, self.backend, self.model_runner = ctx.state, ctx.backend, ctx.model_runner
        self.delayed_verification = ctx.delayed_verification
        self.profiler = profiler or CycleProfiler(phases=self.PHASES, values=self.VALUES)
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
        # Adaptive speculation: the policy, the pool rows decoding densely (their PillarState
        # says so: PillarState.stop_speculating), and what the GPU measured, not yet read.
        # Under tensor parallelism only the group's first rank has a policy; the others take
        # its choices (ScheduleContext.tp_group).
        self.adaptive = ctx.adaptive
        self.tp_group = ctx.tp_group
        self.policy: Optional[AdaptivePolicy] = None
        self.dense: set[int] = set()
        self.plain = ForwardGraphs(ctx.model_runner, ctx.dense_backend or ctx.backend, label="plain-decode")
        self._measured: collections.deque = collections.deque()
        self._generation: dict[int, int] = collections.defaultdict(int)  # per pool row: forgets
        self._token_shares: list[float] = []  # read from finished steps, noted at a step's end
        if ctx.adaptive and (ctx.tp_group is None or ctx.tp_group.chooses):
            self.policy = AdaptivePolicy(self.k, ctx.state.selection,
                                         PassCostFit(model_shape_prior(ctx.model_runner)))

    @classmethod
    def kv_reserve_per_decode(cls, k: int) -> Optional[int]:
        # A request verifies in one of the k + 1 passes and drafts in the later ones: up to
        # 2k + 1 positions past the step's committed length, 3 (k + 1) with the overlap
        # scheduler's one-verify lag of the committed length. A dense row writes k + 1.
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
        if self.adaptive:
            # All-dense passes are plain decode forwards: SGLang's own decode graphs, at the
            # server's decode batch sizes.
            self.plain.capture(None)

    def handles(self, batch: Any) -> bool:
        """Batches that need per-token logprobs, a grammar or hidden states run lockstep: those
        SGLang helpers expect one verify forward of the whole batch."""
        return bool(batch.reqs) and not (batch.return_logprob or batch.has_grammar
                                         or getattr(batch, "return_hidden_states", False))

    def forget(self, pool_rows: list[int]) -> None:
        """These rows start over (a prefill, or a lockstep step verified them): no drafts, no
        mode (either leaves a fresh selection in PillarState: the first-step window, or the
        verify's), no policy state."""
        for row in pool_rows:
            self._drop(row)

    def _drop(self, row: int) -> None:
        if row in self.planner.offset:
            self.planner.release(row)
        self.dense.discard(row)
        if self.policy is not None:
            self.policy.forget(row)
            self._generation[row] += 1  # measurements still in flight are not this request's

    def step(self, batch: Any, rows: list[int]) -> StepResult:
        """k + 1 passes; every request of the batch verifies in exactly one of them (a dense
        request decodes one token in each)."""
        self.timer.begin_step()
        self.profiler.begin()
        batch_pos = {row: i for i, row in enumerate(rows)}
        left = [r for r in [*self.planner.offset, *self.dense] if r not in batch_pos]
        for row in left:
            self._drop(row)  # finished, aborted or retracted
        switched, cost = self._choose_modes(batch, rows)
        joined = [row for row in rows if row not in self.planner.offset and row not in self.dense]
        for row in joined:
            self.planner.admit(row)
        moves = self.planner.shortened_cycles
        dense = [batch_pos[r] for r in rows if r in self.dense]
        layouts = [PassLayout.of(self.planner.next_pass(), batch_pos, dense, j) for j in range(self.width)]
        # A step's passes are steady unless requests joined or left, switched modes, or the
        # previous step's last pass moved requests between offsets (their next cycle is a short one).
        steady = not (left or joined or switched or self._moved)
        self._moved = self.planner.shortened_cycles != moves

        bs, w = len(rows), self.width
        committed = batch.seq_lens.clone()
        tokens = torch.zeros((bs, w), dtype=torch.int32, device=self.device)
        lens = torch.zeros((bs,), dtype=torch.int32, device=self.device)
        host, offsets = _pack(layouts, w)
        indices = torch.tensor(host + dense, dtype=torch.int64).to(self.device, non_blocking=True)
        dense_at = slice(len(host), len(host) + len(dense))
        passes = []
        logits_output = None
        with borrowed(batch) as saved:
            batch.forward_mode = ForwardMode.DECODE
            batch.return_logprob = False
            for layout, where in zip(layouts, offsets):
                # The policy times the whole pass (inputs, forward, acceptance, and any time the
                # GPU waits for the host): what a plan costs over a plain decode forward is there.
                start = self._recorded_event() if cost is not None else None
                logits_output = self._pass(batch, saved, layout, indices, where, committed, tokens, lens)
                if start is not None:
                    passes.append((start, self._recorded_event(), self._pass_kv(layout, *cost),
                                   layout.num_rows, layout.planned))
                if not self.delayed_verification and layout.verify_batch:
                    t0 = time.perf_counter()
                    torch.get_device_module(self.device).current_stream().synchronize()
                    self.timer.waited(time.perf_counter() - t0)
            if dense:
                # A dense request emitted one token per pass (the last pass left it pending).
                dense_batch = indices[dense_at]
                lens[dense_batch] = w
                committed[dense_batch] += w
            self.timer.end_step(len(layouts))
            self._measure(rows, dense, passes, lens)
            self.profiler.end_cycle(bs, lens)
        self.pass_tokens += [(bs, layout.num_rows, steady) for layout in layouts]
        self.steps += 1
        if self.steps % LOG_EVERY == 0:
            self._log()
        return StepResult(tokens.flatten(), lens, committed, logits_output, self.graphs.captured)

    # ------------------------------------------------------------------ adaptive speculation

    def _choose_modes(self, batch: Any, rows: list[int]) -> tuple[bool, Optional[tuple]]:
        """Ask the policy which requests speculate in this step (what it measured so far folded
        in first; under tensor parallelism the first rank asks, the others receive its answer)
        and move the switching ones between the planner and the dense rows. Returns whether any
        switched, and what :meth:`_pass_kv` needs (None on a rank without a policy)."""
        if not self.adaptive:
            return False, None
        chosen, cost = None, None
        if self.policy is not None:
            self._read_measurements()
            contexts = batch.seq_lens_cpu.tolist()
            decided = self.policy.decide({row: int(c) for row, c in zip(rows, contexts)})
            cost = self._kv_model(rows, decided, contexts)
            chosen = [decided[row] for row in rows]
        if self.tp_group is not None:
            chosen = self.tp_group.agree(chosen, len(rows))
        modes = dict(zip(rows, chosen))
        stop = [i for i, row in enumerate(rows) if not modes[row] and row not in self.dense]
        start = [i for i, row in enumerate(rows) if modes[row] and row in self.dense]
        for i in stop:
            if rows[i] in self.planner.offset:
                self.planner.release(rows[i])  # its drafts are dropped: only proposals
            self.dense.add(rows[i])
        for i in start:
            self.dense.discard(rows[i])  # joins the planner below, as a newcomer
        if stop:
            at = torch.tensor(stop, dtype=torch.int64).to(self.device, non_blocking=True)
            self.state.stop_speculating(batch.req_pool_indices[at])
        if start:
            at = torch.tensor(start, dtype=torch.int64).to(self.device, non_blocking=True)
            self.state.start_speculating(batch.req_pool_indices[at], batch.seq_lens[at])
        return bool(stop or start), cost

    def _kv_model(self, rows: list[int], modes: dict[int, bool], contexts: list[int]) -> tuple:
        """Per step, what :meth:`_pass_kv` needs: the committed lengths (host values), each
        request's KV tokens per draft step (the policy's, from its decision), the dense requests'
        summed context and count."""
        drafted = [self.policy.drafted[row] if modes[row] else 0.0 for row in rows]
        dense = [c for row, c in zip(rows, contexts) if not modes[row]]
        return contexts, drafted, sum(dense), len(dense)

    def _pass_kv(self, layout: PassLayout, contexts: list[int], drafted: list[float],
                 dense_context: int, num_dense: int) -> float:
        """KV tokens one pass reads: a draft row its sinks + selection + tail, a dense row its
        context, a verify chain its context once."""
        pass_index = layout.row_index[layout.num_drafting] if num_dense else 0
        kv = sum(drafted[b] for b in layout.row_batch[:layout.num_drafting])
        kv += dense_context + num_dense * (pass_index + 1)
        return kv + sum(contexts[b] + n for b, n in zip(layout.verify_batch, layout.verify_lens))

    def _recorded_event(self) -> Any:
        event = _event(self.device)
        event.record()
        return event

    def _measure(self, rows: list[int], dense: list[int], passes: list, lens: torch.Tensor) -> None:
        """Queue what this step measured for the policy (read once the GPU is past it) and note
        the share of speculating requests."""
        bs = len(rows)
        self.profiler.note("speculating_requests_share", 1 - len(dense) / bs)
        if self.policy is None:
            if not self.adaptive:
                self.profiler.note("speculating_tokens_share", 1.0)
            return  # a rank that takes the first rank's choices measures nothing for them
        for share in self._token_shares:  # read at this step's start
            self.profiler.note("speculating_tokens_share", share)
        self._token_shares.clear()
        host_lens = lens
        if lens.is_cuda:
            host_lens = torch.empty(lens.shape, dtype=lens.dtype, pin_memory=True)
            host_lens.copy_(lens, non_blocking=True)
        done = self._recorded_event()
        speculating = [(i, row, self._generation[row]) for i, row in enumerate(rows) if row not in self.dense]
        self._measured.append((passes, host_lens, speculating, done))

    def _read_measurements(self) -> None:
        """Fold every step the GPU has finished into the policy, oldest first, without waiting."""
        while self._measured and self._measured[0][3].query():
            passes, host_lens, speculating, _ = self._measured.popleft()
            for start, end, kv, num_rows, planned in passes:
                self.policy.observe_pass(kv, num_rows, start.elapsed_time(end) / 1e3, planned)
            lens = host_lens.tolist()
            for i, row, generation in speculating:
                if self._generation[row] == generation:
                    self.policy.observe_verify(row, lens[i] - 1)
            total = sum(lens)
            self._token_shares.append(sum(lens[i] for i, _, _ in speculating) / total if total else 0.0)

    # ------------------------------------------------------------------ one pass

    def _pass(self, batch: Any, saved: dict[str, Any], layout: PassLayout, indices: torch.Tensor,
              where: dict[str, slice], committed: torch.Tensor, tokens: torch.Tensor,
              lens: torch.Tensor) -> Any:
        """One pass on the borrowed batch: its rows' inputs, one forward, the verifies' and dense
        rows' acceptance. ``indices`` holds every pass's index arrays on the device, this pass's
        at ``where``. Returns the logits output."""
        state, w = self.state, self.width
        req_pool_indices, seq_lens_cpu = saved["req_pool_indices"], saved["seq_lens_cpu"]
        t, d, nv = layout.num_rows, layout.num_draft, len(layout.verify_batch)
        nd, nr = layout.num_drafting, layout.num_draft - layout.num_drafting  # drafting, dense rows
        row_batch, row_index = indices[where["row_batch"]], indices[where["row_index"]]
        pool = req_pool_indices[row_batch]
        pos = committed[row_batch] + row_index
        prev = self.drafts[pool, (row_index - 1).clamp(min=0)]
        input_ids = torch.where(row_index == 0, state.pending[pool], prev)
        seq_lens = pos + 1
        verify_batch = indices[where["verify_batch"]]
        verify_pool, verify_prefix = req_pool_indices[verify_batch], committed[verify_batch]
        verify_lens = indices[where["verify_lens"]].to(torch.int32)
        batch.seq_lens_cpu = (seq_lens_cpu[layout.row_batch]
                              + torch.tensor(layout.row_index, dtype=seq_lens_cpu.dtype) + 1)
        # No host sum of the lengths: the host's lengths can lag the device's under the overlap
        # scheduler, and SGLang's decode path (an all-dense pass) then sizes from the device's.
        batch.seq_lens_sum = None
        if not layout.planned:
            batch.spec_info = None  # every row dense: SGLang's own decode forward, no plan
        else:
            drafting = pool[:d]
            batch.spec_info = self.rows.fill(
                pool=pool, seq_lens=seq_lens, dense_start=state.dense_start[drafting],
                sel_lens=state.sel_lens[drafting], qo_indptr=indices[where["qo_indptr"]],
                verify_pool=verify_pool, verify_prefix=verify_prefix, verify_lens=verify_lens,
                num_draft=d, num_drafting=nd)
        batch.input_ids = input_ids
        batch.req_pool_indices = pool
        batch.out_cache_loc = state.req_to_token[pool, pos].to(torch.int64)
        batch.seq_lens = seq_lens
        forward_batch = ForwardBatch.init_new(batch, self.model_runner,
                                              return_hidden_states_before_norm=False)
        self.profiler.mark("inputs")
        self.timer.forward_start()
        logits = (self.plain if batch.spec_info is None else self.graphs).run(forward_batch)
        self.timer.forward_end()
        self.profiler.mark("forward")

        if nd:
            self.drafts[pool[:nd], row_index[:nd]] = torch.argmax(logits[:nd], dim=-1)
        last_dense = None
        if nr:
            # Dense rows: a plain decode step each, accepted as a chain of one token (the
            # target's greedy token or its sample under the request's own parameters).
            dense = slice(nd, d)
            dense_batch = row_batch[dense]
            got = accept(verify_chains(input_ids[dense], pos[dense], pos[dense], 1), batch,
                         LogitsProcessorOutput(next_token_logits=logits[dense]),
                         self.ctx.sampling_backend, requests=dense_batch)
            pass_index = layout.row_index[nd]
            tokens[dense_batch, pass_index] = got.tokens[:, 0]
            if pass_index < self.k:
                self.drafts[pool[dense], pass_index] = got.tokens[:, 0].to(torch.int64)  # the next pass's input
            else:
                last_dense = (pool[dense], got.tokens[:, 0])  # the next step's first input
        if not nv:
            if last_dense is not None:
                state.set_pending(*last_dense)
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
        if last_dense is not None:
            state.set_pending(*last_dense)
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


class _HostEvent:
    """A CUDA event's interface on the host clock (a device without CUDA runs each forward
    synchronously, so the host times it)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: "_HostEvent") -> float:
        return (end.t - self.t) * 1e3  # ms, as a CUDA event's


def _event(device: torch.device) -> Any:
    return torch.cuda.Event(enable_timing=True) if device.type == "cuda" else _HostEvent()


def model_shape_prior(model_runner: Any) -> PassCost:
    """The pass-cost prior of this rank's model: its weights and each KV token read once at
    :data:`PRIOR_BANDWIDTH`, 2 FLOPs per weight and row at :data:`PRIOR_FLOPS`, a plan's cost
    :data:`PRIOR_PLAN_SECONDS`."""
    params = list(model_runner.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    pool = model_runner.token_to_kv_pool
    kv_bytes = (pool.layer_num * pool.head_num * (pool.head_dim + pool.v_head_dim)
                * pool.store_dtype.itemsize)
    row_seconds = 2 * sum(p.numel() for p in params) / PRIOR_FLOPS
    return PassCost.prior(weight_bytes, kv_bytes, PRIOR_BANDWIDTH, row_seconds=row_seconds,
                          plan_seconds=PRIOR_PLAN_SECONDS)


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
