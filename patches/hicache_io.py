"""Hooks that time HiCache's host copies for the KV offload log line (sparsespec_sglang/offload.py).

Nothing is measured until the process has kept a retracted request's KV
(``offload.activate()`` from patches/retraction.py); until then each hook only calls SGLang.

Targets and why:
- ``sglang.srt.managers.cache_controller.HiCacheController.start_writing`` (AROUND): issues one
  merged device->host copy of the queued write operations on the write stream; timed with an
  event on the compute stream at issue (where SGLang's own untimed start event sits) and one on
  the write stream after the copy.
- ``...HiCacheController.start_loading`` (AROUND): the host->device copy, layer by layer on the
  load stream; SGLang already brackets it with timing events (the load ack), which are reused.
- ``...HiCacheController.write`` (AROUND): returns None when the host pool has no room; counted
  and logged (HiCache then evicts older host copies and retries).
- ``...LayerDoneCounter.wait_until`` (AROUND): a forward that reads a loading request's KV makes
  the compute stream wait for each layer's load; when that layer's load had not completed at
  issue time, events around the wait measure how long the compute stream was blocked.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from sparsespec_sglang.compat import HookType

from sparsespec_sglang import offload
from sparsespec_sglang.patches import register_once



def _bytes_per_token(controller: Any) -> int:
    per_token = controller.mem_pool_host.size_per_token
    if getattr(controller, "has_draft", False):
        per_token += controller.mem_pool_host_draft.size_per_token
    return int(per_token)


def start_writing(original: Callable, self: Any) -> Any:
    stats = offload.active_stats()
    if stats is None or not self.write_queue:
        return original(self)
    tokens = sum(len(op.host_indices) for op in self.write_queue)
    start = stats.event()
    start.record()
    result = original(self)
    end = stats.event()
    end.record(self.write_stream)
    stats.add("write", tokens * _bytes_per_token(self), start, end)
    return result


def write(original: Callable, self: Any, *args: Any, **kwargs: Any) -> Any:
    host_indices = original(self, *args, **kwargs)
    stats = offload.active_stats()
    if host_indices is None and stats is not None:
        device_indices = kwargs["device_indices"] if "device_indices" in kwargs else args[0]
        stats.note_host_full(len(device_indices))
    return host_indices


def start_loading(original: Callable, self: Any) -> Any:
    stats = offload.active_stats()
    if stats is None or not self.load_queue:
        return original(self)
    tokens = sum(len(op.host_indices) for op in self.load_queue)
    producer = original(self)
    if producer >= 0 and self.ack_load_queue:
        ack = self.ack_load_queue[-1]
        if ack.timing_enabled:
            stats.add("load", tokens * _bytes_per_token(self), ack.start_event, ack.finish_event)
    return producer


def wait_until(original: Callable, self: Any, threshold: int) -> Any:
    stats = offload.active_stats()
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
    ("HiCacheController.write", write, HookType.AROUND),
    ("HiCacheController.start_loading", start_loading, HookType.AROUND),
    ("LayerDoneCounter.wait_until", wait_until, HookType.AROUND),
)


def register() -> None:
    register_once(__name__, HOOKS)
