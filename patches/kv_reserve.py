"""Hooks on SGLang's per-decode KV reserve: a unified step drafts past its verify window.

SGLang's spec-v2 path grows every running request's KV allocation to its committed length plus
``get_alloc_reserve_per_decode()`` = 2 (k + 1) before each decode step (the 2x absorbs the
overlap scheduler's one-verify lag of the committed length). A lockstep step writes at most
k + 1 positions past the committed length. A unified step (``--sparsespec-schedule unified``)
verifies a request in one of its k + 1 passes and lets it draft in the later ones, so it
writes up to 2k + 1 positions past the committed length at the step's start; with the lag that
needs a reserve of 3 (k + 1), and a ``req_to_token`` row that much wider than the context.

Targets (AROUND; SGLang propagates the patch to the modules that imported them):
- ``get_alloc_reserve_per_decode``: the reserve used by ``eagle_prepare_for_decode`` and the
  scheduler's decode memory check;
- ``get_req_to_token_extra_context_len``: the row headroom.
Both take an optional ``server_args`` up to 0.5.17 and nothing from 0.5.18 on, when they read the
published runtime context; the hooks accept both and read the published ``ServerArgs`` when none
is passed. Every other server (plain, other algorithms, SPARSESPEC lockstep) is untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from sparsespec_sglang.compat import HookType, alloc_page_size

from sparsespec_sglang.patches import register_hooks
from sparsespec_sglang.validation import sparsespec_config


def unified_reserve(server_args: Any) -> Optional[int]:
    """The reserve a unified SPARSESPEC server needs, or None for any other server."""
    config = sparsespec_config(server_args)
    if config is None:
        return None
    from sparsespec_sglang.schedule import schedule_class

    return schedule_class(config.schedule).kv_reserve_per_decode(config.num_draft_steps)


def _server_args(args: tuple, kwargs: dict[str, Any]) -> Any:
    server_args = args[0] if args else kwargs.get("server_args")
    if server_args is not None:
        return server_args
    from sparsespec_sglang.compat import get_server_args

    return get_server_args()


def get_alloc_reserve_per_decode(original: Callable, *args: Any, **kwargs: Any) -> int:
    reserve = original(*args, **kwargs)
    need = unified_reserve(_server_args(args, kwargs))
    return reserve if need is None else max(reserve, need)


def get_req_to_token_extra_context_len(original: Callable, *args: Any, **kwargs: Any) -> int:
    extra = original(*args, **kwargs)
    server_args = _server_args(args, kwargs)
    need = unified_reserve(server_args)
    # + 4: SGLang's own slack beyond the speculative tokens.
    return extra if need is None else max(extra, need + 4 + alloc_page_size(server_args) - 1)


HOOKS = (
    ("get_alloc_reserve_per_decode",
     get_alloc_reserve_per_decode, HookType.AROUND),
    ("get_req_to_token_extra_context_len",
     get_req_to_token_extra_context_len, HookType.AROUND),
)


def register() -> None:
    register_hooks(HOOKS)
