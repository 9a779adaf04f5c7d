"""Host KV offload traffic: what HiCache copied, how fast, and how long compute waited for it.

A retracted request whose KV is kept (patches/retraction.py) leaves the GPU through HiCache's
device->host writes and comes back through its host->device loads, both on HiCache's own CUDA
streams. :class:`TransferStats` keeps CUDA-event pairs around each copy and around each time a
forward makes the compute stream wait for a layer that is still loading, reads them only once
they have completed (``query()``, never a host sync) and logs totals: GB moved, GB/s of copy
time, and milliseconds of compute-stream wait. Hooks: patches/hicache_io.py. Measuring starts
in a process when it first keeps a retracted request's KV (:func:`activate`), so servers that
do not use the offload pay nothing.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

KINDS = ("write", "load", "wait")


class TransferStats:
    """Totals per kind: ``write`` (device->host), ``load`` (host->device), ``wait`` (compute
    stream blocked on a load; bytes 0).

    Writes queue on one stream. Where a write's start event is recorded on the compute stream when
    it is issued (SGLang 0.5.17, patches/hicache_io.py) and the previous write is still running,
    the overlap is counted once, from the later of the two (busy time, not queueing time); a start
    event recorded on the copy stream itself never overlaps the previous write."""

    def __init__(self, make_event: Callable[[], Any], log_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._make_event = make_event
        self._pending: dict[str, deque] = {k: deque() for k in KINDS}
        self.bytes = dict.fromkeys(KINDS, 0)
        self.ms = dict.fromkeys(KINDS, 0.0)
        self.count = dict.fromkeys(KINDS, 0)
        self._last_write_end: Any = None
        self._log_interval_s = log_interval_s
        self._clock = clock
        self._last_log = clock()
        self._logged_counts: tuple = ()
        self.host_full = 0
        self._last_full_log: Optional[float] = None

    def event(self) -> Any:
        return self._make_event()

    def add(self, kind: str, nbytes: int, start: Any, end: Any) -> None:
        self._pending[kind].append((nbytes, start, end))
        self.poll()

    def poll(self) -> None:
        """Fold in every copy whose end event has completed (in stream order), then maybe log."""
        for kind, pending in self._pending.items():
            while pending and pending[0][2].query():
                nbytes, start, end = pending.popleft()
                ms = start.elapsed_time(end)
                if kind == "write":
                    if self._last_write_end is not None:
                        ms -= max(0.0, start.elapsed_time(self._last_write_end))
                    self._last_write_end = end
                self.bytes[kind] += nbytes
                self.ms[kind] += max(ms, 0.0)
                self.count[kind] += 1
        now = self._clock()
        counts = (*self.count.values(), self.host_full)
        if now - self._last_log >= self._log_interval_s and counts != self._logged_counts:
            self._last_log, self._logged_counts = now, counts
            logger.info("%s", self.summary_line())

    def note_host_full(self, tokens: int) -> None:
        """HiCache evicts older host copies because a new one found the host pool full."""
        self.host_full += 1
        now = self._clock()
        if self._last_full_log is None or now - self._last_full_log >= self._log_interval_s:
            self._last_full_log = now
            logger.warning(
                "SPARSESPEC KV offload: host pool full (%d tokens asked; %d times so far): HiCache evicts "
                "older host copies to make room, and a retracted request whose copy is evicted is "
                "recomputed when re-admitted (nothing is lost). Raise --hicache-ratio or --hicache-size "
                "to keep more on the host.", tokens, self.host_full)

    def gbps(self, kind: str) -> Optional[float]:
        return self.bytes[kind] / self.ms[kind] / 1e6 if self.ms[kind] > 0 else None

    def summary_line(self) -> str:
        def copies(kind: str) -> str:
            rate = self.gbps(kind)
            speed = f"{rate:.1f} GB/s" if rate is not None else "n/a GB/s"
            return (f"{self.bytes[kind] / 1e9:.3f} GB in {self.count[kind]} copies, "
                    f"{self.ms[kind]:.1f} ms of copy time ({speed})")
        return (f"SPARSESPEC KV offload: host writes {copies('write')}; loads {copies('load')}; "
                f"compute stream waited {self.ms['wait']:.1f} ms on loads ({self.count['wait']} layer waits); "
                f"host pool full {self.host_full} times")


# The attribute that carries a tree cache's TransferStats on the SGLang objects whose methods
# patches/hicache_io.py wraps. SGLang hands those hooks nothing but the object itself, so the
# stats ride on it: set once by activate() (from the retraction hook, patches/retraction.py), read
# by every HiCache hook (stats_of), and gone with the tree cache.
STATS_ATTR = "_sparsespec_transfer_stats"


def activate(tree_cache: Any) -> TransferStats:
    """Start timing ``tree_cache``'s HiCache copies (idempotent): one :class:`TransferStats` on the
    tree (host-pool eviction), its cache controller (the copies) and the controller's layer counter
    (the compute stream's waits on loads; the counter SGLang registers with the KV pools). A tree
    without a host tier (no controller) gets it alone: it makes no copies to time."""
    stats = stats_of(tree_cache)
    if stats is None:
        import torch

        stats = TransferStats(lambda: torch.cuda.Event(enable_timing=True))
        controller = getattr(tree_cache, "cache_controller", None)
        owners = [tree_cache] if controller is None else [tree_cache, controller, controller.layer_done_counter]
        for owner in owners:
            setattr(owner, STATS_ATTR, stats)
        logger.info("SPARSESPEC KV offload: timing HiCache's host copies from now on")
    return stats


def stats_of(owner: Any) -> Optional[TransferStats]:
    """The stats :func:`activate` put on a tree cache, its controller or its layer counter; None
    until then (the hooks then only call SGLang)."""
    return getattr(owner, STATS_ATTR, None)
