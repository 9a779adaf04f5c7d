"""HookRegistry hooks into SGLang, one module per hooked target."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from sglang.srt.plugins.hook_registry import HookRegistry

_registered: set[str] = set()


def register_once(owner: str, hooks: Iterable[tuple[str, Callable, Any]]) -> None:
    """Register ``owner``'s (target, hook, hook type) triples once per process; SGLang applies
    them in ``load_plugins``, and repeated ``load_plugins`` calls must not stack wrappers."""
    if owner in _registered:
        return
    _registered.add(owner)
    for target, hook, hook_type in hooks:
        HookRegistry.register(target, hook, hook_type)
