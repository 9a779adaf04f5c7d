"""Per-cycle timing of the SPARSESPEC schedules: where a decode step's time goes.

Always on, without host syncs: every step records CUDA events at the boundaries of its phases,
named by the schedule: lockstep ``draft`` (the k sparse draft forwards), ``verify`` (the verify
forward) and ``accept`` (acceptance, logprobs); unified, summed over the k + 1 passes of a step,
``inputs`` (the pass's row gathers), ``forward`` (the forward that runs the draft rows and the
verify chains side by side, so it has no draft/verify split) and ``accept`` (the acceptance of the
pass's verifying requests). A step's GPU phase times are read once its last event has completed
(``query()``, a few steps later), so timing never stalls the overlap scheduler. Every ``every``
steps the means are logged and, with ``--enable-metrics``, exported as Prometheus gauges
``sparsespec:<phase>_gpu_ms_per_cycle`` next to SGLang's own ``sglang:spec_*`` metrics, with the
schedule's per-step values (``note``; the unified schedule's shares of speculating requests and
tokens) as ``sparsespec:<value>``, each the mean of its last ``gauge_every`` steps. Host
(enqueue) time per phase is kept too: ``gpu_*`` > ``host_*`` means the GPU was the bottleneck of
that phase, ``gpu_*`` ~= ``host_*`` that it waited for the host.

With ``--sparsespec-profile <path.json>`` (``sglang.Engine(sparsespec_profile=...)``; a
measurement for ``scripts/``), the configured schedule's profiler on TP rank 0 also synchronises
every step at its end (so accepted tokens per step and the host time *between* steps are exact,
and throughput drops), ``<path.json>`` is rewritten every 50 steps with the means, and steps
``TRACE_FROM`` to
``TRACE_FROM + TRACE_CYCLES`` run under ``torch.profiler`` (scheduler work between them
included): ``<path>.ops.txt`` (top CPU and CUDA ops) and ``<path>.trace.json`` (Chrome trace).
"""

from __future__ import annotations

import collections
import json
import logging
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

TRACE_FROM, TRACE_CYCLES = 100, 3
# Prometheus gauges by registry and phase: process-wide because SGLang's metrics registry is, and
# it refuses a second metric of the same name, so every profiler that exports in this process (a
# later worker, a test) must reuse the gauge the first created. Filled and read only by
# CycleProfiler.export_metrics; weak, so an entry lives as long as its registry (an id() key
# could be reused by a later registry).
_GAUGES: "weakref.WeakKeyDictionary[Any, dict[str, Any]]" = weakref.WeakKeyDictionary()


class CycleProfiler:
    """Host and GPU time per named phase of a step: ``begin()``, then ``mark(phase)`` at the end
    of every phase (a phase may end several times in one step: the unified passes), then
    ``end_cycle``."""

    def __init__(self, phases: Sequence[str], every: int = 200, path: Optional[str] = None,
                 event_factory: Optional[Callable[[], Any]] = None, gauge_every: int = 16,
                 clock: Callable[[], float] = time.perf_counter, values: Sequence[str] = ()) -> None:
        self.phases = tuple(phases)
        self.values = tuple(values)
        self._recent = {name: collections.deque(maxlen=gauge_every) for name in self.values}
        self.every = every
        self.gauge_every = gauge_every  # gauges refresh more often than the log line
        self.path = Path(path) if path else None
        if event_factory is None and torch.cuda.is_available():
            event_factory = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        self._new_event = event_factory
        self._clock = clock
        self.cycles = 0
        self.batch = 0
        self.host = collections.defaultdict(float)
        self.gpu = collections.defaultdict(float)
        self.gpu_cycles = 0
        self.tokens = 0
        self.between = 0.0
        self._marks: list[tuple[Optional[str], float, Any]] = []  # (phase ended, host time, event)
        self._in_flight: collections.deque = collections.deque()
        self._last_end: Optional[float] = None
        self._trace: Optional[torch.profiler.profile] = None
        self._gauges: Optional[dict[str, Any]] = None

    @classmethod
    def configured(cls, phases: Sequence[str], profile: Optional[str], tp_rank: int = 0,
                   values: Sequence[str] = ()) -> "CycleProfiler":
        """A schedule's profiler for the server's ``--sparsespec-profile`` (``SparseSpecConfig.profile``):
        the per-step profile into that path on TP rank 0, the always-on timing everywhere else."""
        if profile and tp_rank == 0:
            logger.warning("SPARSESPEC: profiling every cycle into %s (syncs each cycle)", profile)
            return cls(phases, every=50, path=profile, values=values)
        return cls(phases, values=values)

    def export_metrics(self, labels: dict[str, str], registry: Any = None) -> None:
        """Publish the GPU phase means as Prometheus gauges (call when --enable-metrics)."""
        from prometheus_client import REGISTRY, Gauge

        registry = registry or REGISTRY
        # A registry refuses a second metric of the same name: one per registry, process, name.
        gauges = _GAUGES.setdefault(registry, {})
        docs = {f"gpu_{phase}_ms": (f"sparsespec:{phase}_gpu_ms_per_cycle",
                                    f"SPARSESPEC: mean GPU time of the {phase} phase per cycle (ms).")
                for phase in self.phases}
        docs.update({name: (f"sparsespec:{name}", f"SPARSESPEC: {name.replace('_', ' ')} per step, "
                                                   f"mean of the last {self.gauge_every} steps.")
                     for name in self.values})
        for key, (name, documentation) in docs.items():
            if name not in gauges:
                gauges[name] = Gauge(name=name, documentation=documentation, labelnames=list(labels),
                                     multiprocess_mode="mostrecent", registry=registry)
        self._gauges = {key: gauges[name].labels(**labels) for key, (name, _) in docs.items()}

    def note(self, name: str, value: float) -> None:
        """One step's ``value`` of ``name`` (one of ``values``; a step may note it late)."""
        self._recent[name].append(value)

    def begin(self) -> None:
        """A step starts."""
        if self._marks:
            raise RuntimeError("CycleProfiler.begin: the previous step has not ended")
        if self.path is not None and self.cycles == TRACE_FROM:
            self._trace = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self._trace.start()
        self._record(None)

    def mark(self, phase: str) -> None:
        """``phase`` ends now: the time since the previous mark (or ``begin``) is its."""
        if phase not in self.phases:
            raise ValueError(f"CycleProfiler.mark: unknown phase {phase!r}; phases: {self.phases}")
        if not self._marks:
            raise RuntimeError("CycleProfiler.mark: call begin() first")
        self._record(phase)

    def _record(self, phase: Optional[str]) -> None:
        event = None
        if self._new_event is not None:
            event = self._new_event()
            event.record()
        self._marks.append((phase, self._clock(), event))

    def end_cycle(self, batch_size: int, accept_lens: torch.Tensor) -> None:
        marks, self._marks = self._marks, []
        missing = set(self.phases) - {phase for phase, _, _ in marks}
        if missing:
            raise RuntimeError(f"CycleProfiler.end_cycle: no mark for phase(s) {sorted(missing)}")
        for (_, a, _), (phase, b, _) in zip(marks, marks[1:]):
            self.host[phase] += b - a
        if marks[0][2] is not None:
            self._in_flight.append([(phase, event) for phase, _, event in marks])
        if self.path is not None:
            if self._in_flight:
                self._in_flight[-1][-1][1].synchronize()
            self.tokens += int(accept_lens.sum())
            if self._last_end is not None:
                self.between += marks[0][1] - self._last_end
            self._last_end = self._clock()
        self._collect()
        self.batch += batch_size
        self.cycles += 1
        if self._trace is not None and self.cycles == TRACE_FROM + TRACE_CYCLES:
            self._write_trace()
        if self.cycles % self.every == 0:
            self._report()
        elif self._gauges is not None and self.cycles % self.gauge_every == 0:
            self._set_gauges(self.summary())  # only with --enable-metrics

    def _collect(self) -> None:
        """Fold in the GPU times of every finished step, oldest first, without waiting."""
        while self._in_flight and self._in_flight[0][-1][1].query():
            marks = self._in_flight.popleft()
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                self.gpu[phase] += a.elapsed_time(b) / 1e3
            self.gpu_cycles += 1

    def summary(self) -> dict:
        n = max(self.cycles, 1)
        out = {"cycles": self.cycles, "mean_batch": self.batch / n}
        out.update({f"host_{k}_ms": 1e3 * self.host[k] / n for k in self.phases})
        if self.gpu_cycles:
            out.update({f"gpu_{k}_ms": 1e3 * self.gpu[k] / self.gpu_cycles for k in self.phases})
            out["gpu_cycle_ms"] = sum(out[f"gpu_{k}_ms"] for k in self.phases)
        out.update({name: sum(recent) / len(recent) for name, recent in self._recent.items() if recent})
        if self.path is not None:
            out["host_between_cycles_ms"] = 1e3 * self.between / max(n - 1, 1)
            out["tokens_per_cycle"] = self.tokens / n
        return out

    def _report(self) -> None:
        summary = self.summary()
        logger.info("SPARSESPEC cycles: %s", json.dumps({k: round(v, 3) for k, v in summary.items()}))
        self._set_gauges(summary)
        if self.path is not None:
            self.path.write_text(json.dumps(summary, indent=1))

    def _set_gauges(self, summary: dict) -> None:
        if self._gauges is not None:
            for key, gauge in self._gauges.items():
                if key in summary:  # GPU times once a step has been read, values once noted
                    gauge.set(summary[key])

    def _write_trace(self) -> None:
        trace, self._trace = self._trace, None
        trace.stop()
        averages = trace.key_averages()
        tables = [f"{TRACE_CYCLES} cycles from cycle {TRACE_FROM}, batch {self.batch / self.cycles:.1f}"]
        for key in ("self_cuda_time_total", "cpu_time_total", "self_cpu_time_total"):
            tables.append(f"== sorted by {key}\n" + averages.table(sort_by=key, row_limit=40))
        Path(f"{self.path}.ops.txt").write_text("\n\n".join(tables))
        trace.export_chrome_trace(f"{self.path}.trace.json")


class PassTimer:
    """Where a unified pass's time goes: a step is k + 1 smaller forwards, so host time between
    them is on the critical path k + 1 times per step.

    Two consecutive steps out of every ``every`` (the last two) are sampled, without host syncs:
    each pass records CUDA events right before and after its model forward (a graph replay or an
    eager forward), and the host time it took to prepare and enqueue the whole pass. Events are read
    once the GPU has passed them (``query()``). On the GPU timeline, the time between one pass's
    forward and the next is the pass's small ops (row gathers, acceptance) plus any time the GPU
    sat idle waiting for the host; across a step boundary it is also the scheduler's work. Their
    sum per pass is therefore an upper bound on the host time *not* hidden behind GPU work.

    A tighter bound: right before launching a forward, the host asks (``query()``, no wait)
    whether the GPU has already finished the previous forward. If not, every op of the gap was
    queued before the GPU reached it, so the GPU never waited for the host there; only gaps the
    host reached late (``host_late``) can hold host time, and their sum is the tighter bound.
    """

    def __init__(self, every: int = 50, event_factory: Optional[Callable[[], Any]] = None) -> None:
        self.every = every
        if event_factory is None and torch.cuda.is_available():
            event_factory = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        self._new_event = event_factory
        self.step = 0
        self._current: Optional[list[list[Any]]] = None  # [start, end, host late] per pass
        self._prev_end: Optional[tuple[int, Any]] = None  # (step, event) of the last forward's end
        self._t0 = self._waited = 0.0
        self._in_flight: collections.deque = collections.deque()  # (step, passes)
        self._last: Optional[tuple[int, Any]] = None  # (step, last forward-end event) resolved
        self.reset()

    def reset(self) -> None:
        self.passes = 0
        self.host_s = 0.0
        self.forward_ms = 0.0
        self.forwards = 0
        self.steps = 0
        self.within_ms = 0.0  # between forwards inside a step
        self.between_ms = 0.0  # from a step's last forward to the next step's first
        self.boundaries = 0
        self.late_ms = 0.0  # the gaps (within and between steps) the host reached late
        self.gaps = self.late_gaps = 0

    @property
    def sampling(self) -> bool:
        # The last two steps of every ``every``: a server's first steps (admission, warm-up) never.
        return self._new_event is not None and self.step % self.every >= self.every - 2

    def begin_step(self) -> None:
        self._t0, self._waited = time.perf_counter(), 0.0

    def forward_start(self) -> None:
        if self.sampling:
            if self._current is None:
                self._current = []
            prev = self._prev_end
            late = prev is not None and prev[0] >= self.step - 1 and bool(prev[1].query())
            self._current.append([self._record(), None, late])

    def forward_end(self) -> None:
        if self.sampling and self._current:
            self._current[-1][1] = self._record()
            self._prev_end = (self.step, self._current[-1][1])

    def waited(self, seconds: float) -> None:
        """Host time spent waiting for the GPU (not preparing work)."""
        self._waited += seconds

    def end_step(self, num_passes: int) -> None:
        if self.sampling:
            self.host_s += time.perf_counter() - self._t0 - self._waited
            self.passes += num_passes
        if self._current:
            self._in_flight.append((self.step, self._current))
        self._current = None
        self.step += 1
        self._collect()

    def _record(self) -> Any:
        event = self._new_event()
        event.record()
        return event

    def _collect(self) -> None:
        while self._in_flight and self._in_flight[0][1][-1][1].query():
            step, passes = self._in_flight.popleft()
            for (_, end, _), (nxt, _, late) in zip(passes, passes[1:]):
                self.within_ms += self._gap(end, nxt, late)
            self.forward_ms += sum(start.elapsed_time(end) for start, end, _ in passes)
            self.forwards += len(passes)
            self.steps += 1
            if self._last is not None and self._last[0] == step - 1:
                self.between_ms += self._gap(self._last[1], passes[0][0], passes[0][2])
                self.boundaries += 1
            self._last = (step, passes[-1][1])

    def _gap(self, end: Any, start: Any, late: bool) -> float:
        gap = end.elapsed_time(start)
        self.gaps += 1
        if late:
            self.late_ms += gap
            self.late_gaps += 1
        return gap

    def summary(self) -> dict:
        """Means in ms over the sampled passes resolved so far ({} before a step boundary)."""
        if not self.boundaries:
            return {}
        per_step = self.within_ms / self.steps + self.between_ms / self.boundaries
        passes = self.forwards / self.steps
        return {"host_ms_per_pass": 1e3 * self.host_s / max(self.passes, 1),
                "forward_gpu_ms": self.forward_ms / self.forwards,
                "step_boundary_gap_ms": self.between_ms / self.boundaries,
                # GPU-timeline time outside the forwards: small ops + waiting for the host
                "outside_forward_ms_per_pass": per_step / passes,
                # of which in gaps the host reached late (the rest was queued ahead of the GPU)
                "host_late_ms_per_pass": self.late_ms / self.forwards,
                "host_late_fraction": self.late_gaps / max(self.gaps, 1)}
