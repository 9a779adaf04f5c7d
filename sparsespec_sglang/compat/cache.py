"""SGLang internals of KV memory: retraction, the per-decode reserve, HiCache, graph sizes, scheduler.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature (see the package docstring).

What changed for the KV-memory hooks (patches/retraction.py, kv_reserve.py, hicache_io.py):

- 0.5.18: the sizing functions read the published runtime context instead of a ``server_args``
  argument; HiCache's copies moved onto ``L2TransferEngine``, whose write acks carry timed events
  and a byte count like the load acks.
- 0.5.19: ``release_req`` lost its ``server_args`` argument; the allocator's page size in the sizing
  is ``get_alloc_page_size()``; ``--enable-hierarchical-cache`` builds a ``UnifiedRadixCache`` (its
  controller a ``HybridCacheController``, which inherits ``start_writing``/``start_loading``)
  instead of a ``HiRadixCache``.
- 0.5.21: ``Req.effective_kv_committed_len`` became ``Req.owned_kv_len``.
- 0.5.22: ``release_kv_cache``'s ``is_insert`` became the keyword-only ``checkpoint``, and a
  checkpoint into a tree that holds mamba state must come from a finished request.
"""

from __future__ import annotations

from typing import Any

from sparsespec_sglang.compat.version import since

_CC = "sglang.srt.managers.cache_controller"
_SIZING = "sglang.srt.mem_cache.allocation_sizing"
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "release_req": (("0.5.17", "sglang.srt.managers.schedule_batch:release_req"),),
    "release_kv_cache": (("0.5.17", "sglang.srt.mem_cache.common:release_kv_cache"),),
    "get_alloc_reserve_per_decode": (("0.5.17", f"{_SIZING}:get_alloc_reserve_per_decode"),),
    "get_req_to_token_extra_context_len": (("0.5.17", f"{_SIZING}:get_req_to_token_extra_context_len"),),
    "HiCacheController.start_writing": (("0.5.17", f"{_CC}:HiCacheController.start_writing"),),
    # The host-pool eviction of the tree cache --enable-hierarchical-cache builds: it runs when a
    # host copy finds the host pool full.
    "HiCache.evict_host": (
        ("0.5.17", "sglang.srt.mem_cache.hiradix_cache:HiRadixCache.evict_host"),
        ("0.5.19", "sglang.srt.mem_cache.unified_radix_cache:UnifiedRadixCache.evict_host"),
    ),
    "HiCacheController.start_loading": (("0.5.17", f"{_CC}:HiCacheController.start_loading"),),
    "LayerDoneCounter.wait_until": (("0.5.17", f"{_CC}:LayerDoneCounter.wait_until"),),
    "Scheduler.maybe_init_draft_worker": (
        ("0.5.17", "sglang.srt.managers.scheduler:Scheduler.maybe_init_draft_worker"),),
    "get_batch_sizes_to_capture": (
        ("0.5.17", "sglang.srt.model_executor.runner.decode_cuda_graph_runner:get_batch_sizes_to_capture"),),
}

ADAPTERS: tuple[str, ...] = (
    "keeping_release_kwargs",
    "tree_keeps_running_kv",
    "kept_kv_len",
    "alloc_page_size",
    "hicache_times_writes",
    "hicache_copy_bytes",
)


def keeping_release_kwargs() -> dict[str, bool]:
    """The ``release_kv_cache`` keyword that has the tree keep the request's KV before its row is
    freed: ``is_insert`` up to 0.5.21, ``checkpoint`` (keyword-only, no default) from 0.5.22."""
    return {"checkpoint": True} if since("0.5.22") else {"is_insert": True}


def tree_keeps_running_kv(tree_cache: Any) -> bool:
    """Whether ``release_kv_cache`` can keep a still-running (retracted) request's KV in
    ``tree_cache``. Up to 0.5.21 it inserted as if the request had finished; from 0.5.22 its
    checkpoint hands a tree that holds mamba state the request's state only once the request has
    finished (SGLang asserts it), so such a tree cannot keep it."""
    return not (since("0.5.22") and tree_cache.supports_mamba())


def kept_kv_len(req: Any) -> int:
    """How much of ``req``'s KV ``release_kv_cache`` hands the tree: ``effective_kv_committed_len()``
    up to 0.5.20, ``owned_kv_len()`` from 0.5.21 (renamed; for a running request the same length)."""
    return req.owned_kv_len() if since("0.5.21") else req.effective_kv_committed_len()


def alloc_page_size(server_args: Any) -> int:
    """The page size SGLang's ``get_req_to_token_extra_context_len`` rounds the reserve up by:
    ``server_args.page_size`` up to 0.5.17, the published schedule's from 0.5.18, that times the
    decode-context-parallel size (``get_alloc_page_size()``) from 0.5.19."""
    if since("0.5.19"):
        from sglang.srt.mem_cache.allocation_sizing import get_alloc_page_size

        return get_alloc_page_size()
    if since("0.5.18"):
        from sglang.srt.runtime_context import get_schedule

        return get_schedule().page_size
    return server_args.page_size


def hicache_times_writes() -> bool:
    """Whether each HiCache device->host write leaves an ack with CUDA events timed on the copy
    stream (``HiCacheAck.timing_enabled``), as loads always have: from 0.5.18 (``L2TransferEngine``).
    Up to 0.5.17 the write ack's events are untimed and the copy runs on ``write_stream``."""
    return since("0.5.18")


def hicache_copy_bytes(controller: Any, ack: Any, tokens: int) -> int:
    """Bytes one HiCache copy of ``tokens`` tokens moved: SGLang's own count (``ack.num_bytes``,
    every host pool the copy touched) from 0.5.18; up to 0.5.17 acks have none, so the host KV
    pool's bytes per token (plus the draft pool's when it rides along) times ``tokens``."""
    if since("0.5.18"):
        return int(ack.num_bytes)
    per_token = controller.mem_pool_host.size_per_token
    if controller.has_draft:
        per_token += controller.mem_pool_host_draft.size_per_token
    return int(tokens * per_token)
