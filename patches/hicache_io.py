"""Hooks that time HiCache's host copies for the KV offload log line (sparsespec_sglang/offload.py).

Nothing is measured until the tree cache has kept a retracted request's KV
(``offload.activate(tree_cache)`` from patches/retraction.py, which puts one ``TransferStats`` on
the tree, its controller and its layer counter: the ``self`` each hook below receives); until
then each hook only calls SGLang.

Targets and why:
- ``HiCacheController.start_writing`` (AROUND): issues one merged device->host copy of the queued
  write operations. From 0.5.18 its ack carries CUDA events timed on the copy stream and the bytes
  moved, which are reused (``compat.hicache_times_writes``); up to 0.5.17 the ack is untimed, so
  the copy is timed with an event on the compute stream at issue (where SGLang's own untimed start
  event sits) and one on ``write_stream`` after the copy.
- ``HiCacheController.start_loading`` (AROUND): the host->device copy, layer by layer on the
  load stream; SGLang already brackets it with timing events (the load ack), which are reused.
  (From 0.5.19 the controller HiCache builds is a ``HybridCacheController``, which inherits both.)
- ``HiCache.evict_host`` (AROUND): the hierarchical tree cache evicts older host copies when a
  copy finds the host pool full; counted and logged.
- ``LayerDoneCounter.wait_until`` (AROUND): a forward that reads a loading request's KV makes
  the compute stream wait for each layer's load; when that layer's load had not completed at
  issue time, events around the wait measure how long the compute stream was blocked.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sparsespec_sglang.compat import HookType, hicache_copy_bytes, hicache_times_writes

from sparsespec_sglang import offload
from sparsespec_sglang.offload import TransferStats
from sparsespec_sglang.patches import register_hooks


def _queued_tokens(queue: list) -> int:
    return sum(len(op.host_indices) for op in queue)


def _add_timed_ack(stats: TransferStats, kind: str, controller: Any, ack: Any, tokens: int) -> None:
    if ack.timing_enabled:
        stats.add(kind, hicache_copy_bytes(controller, ack, tokens), ack.start_event, ack.finish_event)


def start_writing(original: Callable, self: Any) -> Any:
    stats = offload.stats_of(self)
    if stats is None or not self.write_queue:
        return original(self)
    tokens = _queued_tokens(self.write_queue)
    if hicache_times_writes():
        result = original(self)
        _add_timed_ack(stats, "write", self, self.ack_write_queue[-1], tokens)
        return result
    start = stats.event()
    start.record()
    result = original(self)
    end = stats.event()
    end.record(self.write_stream)
    stats.add("write", hicache_copy_bytes(self, self.ack_write_queue[-1], tokens), start, end)
    return result


def start_loading(original: Callable, self: Any) -> Any:
    stats = offload.stats_of(self)
    if stats is None or not self.load_queue:
        return original(self)
    tokens = _queued_tokens(self.load_queue)
    producer = original(self)
    if producer >= 0 and self.ack_load_queue:
        _add_timed_ack(stats, "load", self, self.ack_load_queue[-1], tokens)
    return producer


def evict_host(original: Callable, self: Any, num_tokens: int, *args: Any, **kwargs: Any) -> Any:
    stats = offload.stats_of(self)
    if stats is not None:
        stats.note_host_full(num_tokens)
    return original(self, num_tokens, *args, **kwargs)


def wait_until(original: Callable, self: Any, threshold: int) -> Any:
    stats = offload.stats_of(self)
    if (stats is None or self.consumer_index < 0 or torch.cuda.is_current_stream_capturing()
            or self.events[self.consumer_index].load_events[threshold].query()):
        return original(self, threshold)
    start = stats.event()
    start.record()
    result = original(self, threshold)
    end = stats.event()
    end.record()
    stats.add("wait", 0, start, end)
    return result


HOOKS = (
    ("HiCacheController.start_writing", start_writing, HookType.AROUND),
    ("HiCacheController.start_loading", start_loading, HookType.AROUND),
    ("HiCache.evict_host", evict_host, HookType.AROUND),
    ("LayerDoneCounter.wait_until", wait_until, HookType.AROUND),
)


def register() -> None:
    register_hooks(HOOKS)
