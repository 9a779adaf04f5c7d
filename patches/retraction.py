"""Hooks on SGLang's decode retraction: a retracted request's KV goes to the prefix cache.

When the KV pool runs out during decode, SGLang retracts requests
(``ScheduleBatch.retract_decode``) and frees their KV without inserting it into the radix tree
(``release_kv_cache(..., is_insert=False)``, from 0.5.22 ``checkpoint=False``), so a retracted
request is re-prefilled from scratch (prompt + everything generated) when it is re-admitted.
With ``--enable-hierarchical-cache`` and either SPARSESPEC with host KV offload on (the
default; ``--sparsespec-disable-kv-offload`` turns it off) or, on any other server,
``--sparsespec-keep-retracted-kv``, the KV is inserted into the radix tree instead.
The hierarchical cache (``HiRadixCache``; from 0.5.19 a ``UnifiedRadixCache`` with a host tier)
backs inserted nodes up to its host pool (write-through), and the eviction that makes room
right after (``evict_from_tree_cache`` in ``release_req``, then ``check_decode_mem``) drops
only their GPU copies, so re-admission is a prefix hit loaded back from host memory rather
than a recompute. When the host pool is full, HiCache evicts host nodes and the request is
recomputed as before: nothing is lost either way.

A tree that holds mamba state takes a request's state over only from a finished request from
SGLang 0.5.22 on (``compat.tree_keeps_running_kv``); there the retracted request is recomputed,
and one warning says so.

Targets and why:
- ``release_req`` (AROUND): the retraction path's release; marks the request (``KEEP_KV_ATTR``)
  for the duration of the call when the server's settings ask for its KV to be kept. The
  server's arguments are its ``server_args`` keyword up to 0.5.18 and the published
  ``ServerArgs`` from 0.5.19 on.
- ``release_kv_cache`` (AROUND; SGLang propagates the patch to the modules that imported it):
  for a marked request (inside that ``release_req`` call, which releases it through
  ``release_kv_cache(req, tree_cache, ...)``), keeps the KV in the tree before freeing the row
  (``compat.keeping_release_kwargs``). Every other caller and request is untouched.

State these hooks keep, on the SGLang objects they receive (SGLang gives no other channel from
``release_req`` to the ``release_kv_cache`` it calls, and no per-tree place for a warning):
- ``KEEP_KV_ATTR`` on the ``Req``: set by ``release_req`` around SGLang's body, read by
  ``release_kv_cache``, removed when ``release_req`` returns or raises.
- ``WARNED_MAMBA_ATTR`` on the tree cache: set the first time a tree that holds mamba state
  cannot keep a retracted request's KV (the warning is logged once per tree cache), for the tree's
  lifetime.
- The tree's ``offload.TransferStats`` (``offload.activate``), from its first kept request on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from sparsespec_sglang.compat import (
    HookType,
    kept_kv_len,
    keeping_release_kwargs,
    tree_keeps_running_kv,
)

from sparsespec_sglang import offload
from sparsespec_sglang.patches import register_hooks
from sparsespec_sglang.validation import is_sparsespec, keep_retracted_kv_flag, sparsespec_config

logger = logging.getLogger(__name__)
KEEP_KV_ATTR = "_sparsespec_keep_kv"
WARNED_MAMBA_ATTR = "_sparsespec_warned_mamba"


def keeps_retracted_kv(server_args: Any) -> bool:
    """Whether a retracted request's KV is kept (in the hierarchical cache) for this server:
    SPARSESPEC unless --sparsespec-disable-kv-offload, any other server with
    --sparsespec-keep-retracted-kv; never without --enable-hierarchical-cache."""
    if not getattr(server_args, "enable_hierarchical_cache", False):
        return False
    if not is_sparsespec(server_args):
        return keep_retracted_kv_flag(server_args)
    config = sparsespec_config(server_args)
    return config is not None and config.kv_offload


def _server_args(kwargs: dict[str, Any]) -> Any:
    if "server_args" in kwargs:
        return kwargs["server_args"]
    from sparsespec_sglang.compat import get_server_args

    return get_server_args()


def _tree_keeps(tree_cache: Any) -> bool:
    if tree_keeps_running_kv(tree_cache):
        return True
    if not getattr(tree_cache, WARNED_MAMBA_ATTR, False):
        setattr(tree_cache, WARNED_MAMBA_ATTR, True)
        logger.warning("sparsespec-sglang: retracted requests' KV is not kept (they are recomputed): this "
                       "server's prefix cache holds mamba state, which SGLang hands to the tree only from "
                       "finished requests")
    return False


def release_req(original: Callable, *args: Any, **kwargs: Any) -> Any:
    tree_cache = kwargs["tree_cache"]
    if not keeps_retracted_kv(_server_args(kwargs)) or not _tree_keeps(tree_cache):
        return original(*args, **kwargs)
    req = kwargs["req"]
    logger.info("sparsespec-sglang: retracted request %s keeps its %d KV tokens in the hierarchical cache "
                "(resumes from it instead of recomputing)", getattr(req, "rid", "?"), kept_kv_len(req))
    offload.activate(tree_cache)  # time HiCache's copies from the first kept request on
    setattr(req, KEEP_KV_ATTR, True)
    try:
        return original(*args, **kwargs)
    finally:
        delattr(req, KEEP_KV_ATTR)


def release_kv_cache(original: Callable, req: Any, tree_cache: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(req, KEEP_KV_ATTR, False):
        args, kwargs = (), {**kwargs, **keeping_release_kwargs()}
    return original(req, tree_cache, *args, **kwargs)


HOOKS = (
    ("release_req", release_req, HookType.AROUND),
    ("release_kv_cache", release_kv_cache, HookType.AROUND),
)


def register() -> None:
    register_hooks(HOOKS)
