"""HookRegistry hooks into SGLang, one module per hooked target."""

from __future__ import annotations

from typing import Any, Callable, Iterable


def register_hooks(hooks: Iterable[tuple[str, Callable, Any]]) -> None:
    """Register (name, hook, hook type) triples with SGLang's ``HookRegistry``; the name is the
    hooked SGLang function's ``sparsespec_sglang.compat`` name, whose target depends on the
    installed release. SGLang applies them in ``load_plugins``. A hook the registry already holds
    for its target is skipped, so repeated registrations never stack wrappers: the registry is
    the one record of what is registered (and a ``HookRegistry.reset()`` forgets it)."""
    from sparsespec_sglang.compat import HookRegistry, hook_target, registered_hooks

    for name, hook, hook_type in hooks:
        target = hook_target(name)
        if hook not in registered_hooks(target):
            HookRegistry.register(target, hook, hook_type)
