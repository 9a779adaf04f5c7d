"""Hooks on ``sglang.srt.server_args``: the --sparsespec-* flags and one-line errors.

Targets and why:
- ``ServerArgs.add_cli_args`` (AFTER): adds the --sparsespec-* flags to the parser.
- ``ServerArgs.from_cli_args`` (AROUND): SGLang only forwards dataclass fields, so
  the parsed --sparsespec-* values are handed to ``__init__`` through a context var.
- ``ServerArgs.__init__`` (BEFORE): takes ``sparsespec_*`` keyword arguments (the
  ``sglang.Engine(**kwargs)`` path) and stores all values on the instance, where
  they travel with server_args to the scheduler processes.
- ``ServerArgs.__post_init__`` (BEFORE): refuses --sparsespec-* without SPARSESPEC
  (except --sparsespec-keep-retracted-kv, which is for servers without SPARSESPEC
  only and needs --enable-hierarchical-cache), and SPARSESPEC on a machine without
  CUDA, before SGLang's device probing fails with a stack trace; checks the user's
  attention backend and selects the plugin's before SGLang's device handlers and
  auto-selection touch the field.
- ``prepare_server_args`` (AROUND): turns a SparseSpecArgsError into one line on
  stderr and exit status 2 for ``python -m sglang.launch_server``.
"""

from __future__ import annotations

import argparse
import contextvars
import sys
from typing import Any, Callable

from sparsespec_sglang.compat import HookType

from sparsespec_sglang.config import (
    ALGORITHM_NAME,
    KEEP_RETRACTED_KV,
    OPTIONS,
    OPTIONS_BY_DEST,
    SERVER_ARGS_ATTR,
    SparseSpecArgsError,
    check_keep_retracted_kv,
)
from sparsespec_sglang.patches import register_once
from sparsespec_sglang.validation import is_sparsespec, select_attention_backend

_cli_values: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "sparsespec_cli_values", default=None
)


def add_cli_args(result: Any, parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("SparseSpec (--speculative-algorithm SPARSESPEC)")
    for option in OPTIONS:
        if option.parse is bool:
            group.add_argument(option.flag, action="store_true", default=None, help=option.help)
        else:
            group.add_argument(option.flag, type=option.parse, default=None, help=option.help)


def from_cli_args(original: Callable, cls: type, args: argparse.Namespace) -> Any:
    values = {dest: getattr(args, dest) for dest in OPTIONS_BY_DEST if getattr(args, dest, None) is not None}
    token = _cli_values.set(values)
    try:
        return original(cls, args)
    finally:
        _cli_values.reset(token)


def init(self: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    values = dict(_cli_values.get() or {})
    for key in [k for k in kwargs if k.startswith("sparsespec_")]:
        if key not in OPTIONS_BY_DEST:
            allowed = ", ".join(sorted(OPTIONS_BY_DEST))
            raise SparseSpecArgsError(f"{ALGORITHM_NAME}: unknown keyword argument {key!r}; allowed: {allowed}")
        value = kwargs.pop(key)
        if value is not None:
            values[key] = value
    object.__setattr__(self, SERVER_ARGS_ATTR, values)
    return (self, *args), kwargs


def post_init(self: Any) -> None:
    values = getattr(self, SERVER_ARGS_ATTR, None) or {}
    sparsespec = is_sparsespec(self)
    if not sparsespec:
        # An option with no SparseSpecConfig field (--sparsespec-keep-retracted-kv) is for
        # servers without SPARSESPEC; check_keep_retracted_kv validates it.
        refused = sorted(d for d in values if OPTIONS_BY_DEST[d].field is not None)
        if refused:
            flags = ", ".join(OPTIONS_BY_DEST[d].flag for d in refused)
            raise SparseSpecArgsError(
                f"{flags} need --speculative-algorithm {ALGORITHM_NAME} "
                f"(got {getattr(self, 'speculative_algorithm', None)!r})"
            )
    check_keep_retracted_kv(values.get(KEEP_RETRACTED_KV.dest), sparsespec=sparsespec,
                            hierarchical_cache=bool(getattr(self, "enable_hierarchical_cache", False)))
    if not sparsespec:
        return
    if getattr(self, "device", None) in (None, "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SparseSpecArgsError(
                f"{ALGORITHM_NAME}: needs a CUDA GPU (--device cuda), "
                "but torch.cuda.is_available() is False on this machine"
            )
    select_attention_backend(self)


def prepare_server_args(original: Callable, argv: list[str]) -> Any:
    try:
        return original(argv)
    except SparseSpecArgsError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


HOOKS = (
    ("ServerArgs.add_cli_args", add_cli_args, HookType.AFTER),
    ("ServerArgs.from_cli_args", from_cli_args, HookType.AROUND),
    ("ServerArgs.__init__", init, HookType.BEFORE),
    ("ServerArgs.__post_init__", post_init, HookType.BEFORE),
    ("prepare_server_args", prepare_server_args, HookType.AROUND),
)


def register() -> None:
    register_once(__name__, HOOKS)


def register_error_hook() -> None:
    """Only the launcher's one-line error (on an SGLang release the plugin does not support)."""
    register_once(f"{__name__}.errors", [h for h in HOOKS if h[1] is prepare_server_args])
