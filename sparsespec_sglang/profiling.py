"""Per-cycle timing of the SPARSESPEC worker: where a cycle's time goes.

Always on: host time of each phase, logged every ``every`` cycles (cheap, no sync; without
a sync it measures how long the host takes to *enqueue* a phase, not the GPU's time).

With ``SPARSESPEC_PROFILE=<path.json>`` in the server's environment (a measurement switch for
``scripts/``, not a server flag), every cycle also records CUDA events around the draft steps,
the verify forward and the acceptance tail, synchronises at the cycle's end, and rewrites
``<path.json>`` every ``every`` cycles with the means. The sync removes the overlap of the
next step's CPU work with this cycle's GPU work, so throughput under profiling is lower; the
per-phase GPU times are what it is for. ``gpu_*`` > ``host_*`` for a phase means the GPU was
the bottleneck there; ``gpu_*`` ~= ``host_*`` means the GPU waited for the host. Cycles
``TRACE_FROM`` to ``TRACE_FROM + TRACE_CYCLES`` also run under ``torch.profiler`` (scheduler
work between them included): ``<path>.ops.txt`` (top CPU and CUDA ops) and
``<path>.trace.json`` (Chrome trace) are written next to the summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

PROFILE_ENV = "SPARSESPEC_PROFILE"
PHASES = ("draft", "verify", "accept")
TRACE_FROM, TRACE_CYCLES = 100, 3


class CycleProfiler:
    def __init__(self, every: int = 200, path: Optional[str] = None) -> None:
        self.every = every
        self.path = Path(path) if path else None
        self.cycles = 0
        self.host = defaultdict(float)
        self.gpu = defaultdict(float)
        self.tokens = 0
        self.batch = 0
        self._marks: list[tuple[float, Optional[torch.cuda.Event]]] = []
        self._last_end: Optional[float] = None
        self.between = 0.0
        self._trace: Optional[torch.profiler.profile] = None

    @classmethod
    def from_env(cls, tp_rank: int = 0) -> "CycleProfiler":
        path = os.environ.get(PROFILE_ENV)
        if path and tp_rank == 0:
            logger.warning("SPARSESPEC: profiling every cycle into %s (syncs each cycle)", path)
            return cls(every=50, path=path)
        return cls()

    def mark(self) -> None:
        """Phase boundary: call once before the drafts and after each phase in PHASES."""
        event = None
        if self.path is not None and not self._marks and self.cycles == TRACE_FROM:
            self._trace = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            self._trace.start()
        if self.path is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self._marks.append((time.perf_counter(), event))

    def end_cycle(self, batch_size: int, accept_lens: torch.Tensor) -> None:
        marks, self._marks = self._marks, []
        assert len(marks) == len(PHASES) + 1, "mark() once before and once after each phase"
        if self.path is not None:
            marks[-1][1].synchronize()
            for name, (_, a), (_, b) in zip(PHASES, marks, marks[1:]):
                self.gpu[name] += a.elapsed_time(b) / 1e3
            self.tokens += int(accept_lens.sum())
            if self._last_end is not None:
                self.between += marks[0][0] - self._last_end
            self._last_end = time.perf_counter()
        for name, (a, _), (b, _) in zip(PHASES, marks, marks[1:]):
            self.host[name] += b - a
        self.batch += batch_size
        self.cycles += 1
        if self._trace is not None and self.cycles == TRACE_FROM + TRACE_CYCLES:
            self._write_trace()
        if self.cycles % self.every == 0:
            self._report()

    def _write_trace(self) -> None:
        trace, self._trace = self._trace, None
        trace.stop()
        averages = trace.key_averages()
        tables = [f"{TRACE_CYCLES} cycles from cycle {TRACE_FROM}, batch {self.batch / self.cycles:.1f}"]
        for key in ("self_cuda_time_total", "cpu_time_total", "self_cpu_time_total"):
            tables.append(f"== sorted by {key}\n" + averages.table(sort_by=key, row_limit=40))
        Path(f"{self.path}.ops.txt").write_text("\n\n".join(tables))
        trace.export_chrome_trace(f"{self.path}.trace.json")

    def summary(self) -> dict:
        n = max(self.cycles, 1)
        out = {"cycles": self.cycles, "mean_batch": self.batch / n}
        out.update({f"host_{k}_ms": 1e3 * v / n for k, v in self.host.items()})
        if self.path is not None:
            out.update({f"gpu_{k}_ms": 1e3 * v / n for k, v in self.gpu.items()})
            out["gpu_cycle_ms"] = sum(out[f"gpu_{k}_ms"] for k in PHASES)
            out["host_between_cycles_ms"] = 1e3 * self.between / max(n - 1, 1)
            out["tokens_per_cycle"] = self.tokens / n
        return out

    def _report(self) -> None:
        summary = self.summary()
        logger.info("SPARSESPEC cycles: %s", json.dumps({k: round(v, 3) for k, v in summary.items()}))
        if self.path is not None:
            self.path.write_text(json.dumps(summary, indent=1))
