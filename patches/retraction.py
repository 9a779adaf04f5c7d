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
- ``release_req`` (AROUND): the retraction path's release; marks the call (a context variable)
  when the server's settings ask for the KV to be kept. The server's arguments are its
  ``server_args`` keyword up to 0.5.18 and the published ``ServerArgs`` from 0.5.19 on.
- ``release_kv_cache`` (AROUND; SGLang propagates the patch to the modules that imported it):
  inside a marked ``release_req`` call, keeps the KV in the tree before freeing the row
  (``compat.keeping_release_kwargs``). Every other caller is untouched.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any, Callable

from sparsespec_sglang.compat import (
    HookType,
    kept_kv_len,
    keeping_release_kwargs,
    tree_keeps_running_kv,
)

from sparsespec_sglang import offload
from sparsespec_sglang.patches import register_once
from sparsespec_sglang.validation import is_sparsespec, keep_retracted_kv_flag, sparsespec_config

logger = logging.getLogger(__name__)
_keep_kv: contextvars.ContextVar[bool] = contextvars.ContextVar("sparsespec_keep_kv", default=False)
_warned_mamba = False


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
    global _warned_mamba
    if tree_keeps_running_kv(tree_cache):
        return True
    if not _warned_mamba:
        _warned_mamba = True
        logger.warning("sparsespec-sglang: retracted requests' KV is not kept (they are recomputed): this "
                       "server's prefix cache holds mamba state, which SGLang hands to the tree only from "
                       "finished requests")
    return False


def release_req(original: Callable, *args: Any, **kwargs: Any) -> Any:
    if not keeps_retracted_kv(_server_args(kwargs)) or not _tree_keeps(kwargs["tree_cache"]):
        return original(*args, **kwargs)
    req = kwargs["req"]
    logger.info("sparsespec-sglang: retracted request %s keeps its %d KV tokens in the hierarchical cache "
                "(resumes from it instead of recomputing)", getattr(req, "rid", "?"), kept_kv_len(req))
    offload.activate()  # time HiCache's copies from the first kept request on
    token = _keep_kv.set(True)
    try:
        return original(*args, **kwargs)
    finally:
        _keep_kv.reset(token)


def release_kv_cache(original: Callable, req: Any, tree_cache: Any, *args: Any, **kwargs: Any) -> Any:
    if _keep_kv.get():
        args, kwargs = (), {**kwargs, **keeping_release_kwargs()}
    return original(req, tree_cache, *args, **kwargs)


HOOKS = (
    ("release_req", release_req, HookType.AROUND),
    ("release_kv_cache", release_kv_cache, HookType.AROUND),
)


def register() -> None:
    register_once(__name__, HOOKS)
