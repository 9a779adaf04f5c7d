"""SGLang internals of KV memory: retraction, the per-decode reserve, HiCache, graph sizes, scheduler.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature (see the package docstring).
"""

from __future__ import annotations

_CC = "sglang.srt.managers.cache_controller"
_SIZING = "sglang.srt.mem_cache.allocation_sizing"
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "release_req": (("0.5.17", "sglang.srt.managers.schedule_batch:release_req"),),
    "release_kv_cache": (("0.5.17", "sglang.srt.mem_cache.common:release_kv_cache"),),
    "get_alloc_reserve_per_decode": (("0.5.17", f"{_SIZING}:get_alloc_reserve_per_decode"),),
    "get_req_to_token_extra_context_len": (("0.5.17", f"{_SIZING}:get_req_to_token_extra_context_len"),),
    "HiCacheController.start_writing": (("0.5.17", f"{_CC}:HiCacheController.start_writing"),),
    "HiCacheController.write": (("0.5.17", f"{_CC}:HiCacheController.write"),),
    "HiCacheController.start_loading": (("0.5.17", f"{_CC}:HiCacheController.start_loading"),),
    "LayerDoneCounter.wait_until": (("0.5.17", f"{_CC}:LayerDoneCounter.wait_until"),),
    "Scheduler.maybe_init_draft_worker": (
        ("0.5.17", "sglang.srt.managers.scheduler:Scheduler.maybe_init_draft_worker"),),
    "get_batch_sizes_to_capture": (
        ("0.5.17", "sglang.srt.model_executor.runner.decode_cuda_graph_runner:get_batch_sizes_to_capture"),),
}

ADAPTERS: tuple[str, ...] = ()
