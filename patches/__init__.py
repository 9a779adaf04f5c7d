"""HookRegistry hooks into SGLang, one module per hooked target."""

from __future__ import annotations

from typing import Any, Callable, Iterable


_registered: set[str] = set()


def register_once(owner: str, hooks: Iterable[tuple[str, Callable, Any]]) -> None:
    """Register ``owner``'s (name, hook, hook type) triples once per process; the name is the
    hooked SGLang function's ``sparsespec_sglang.compat`` name, whose target depends on the
    installed release. SGLang applies them in ``load_plugins``, and repeated ``load_plugins``
    calls must not stack wrappers."""
    if owner in _registered:
        return
    _registered.add(owner)
    from sparsespec_sglang.compat import HookRegistry, hook_target

    for name, hook, hook_type in hooks:
        HookRegistry.register(hook_target(name), hook, hook_type)
