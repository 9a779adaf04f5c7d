"""Hooks on SGLang's server arguments: the --sparsespec-* flags, ``sparsespec_*`` keyword arguments,
the checks that run just before SGLang resolves a ``ServerArgs``, and one-line errors.

The --sparsespec-* values live in the record's ``SERVER_ARGS_ATTR`` attribute, which travels with
it to the scheduler processes. How a record is built and resolved differs by SGLang release
(``sparsespec_sglang.compat.server_args``): up to 0.5.18 construction resolves it; from 0.5.19
``resolve_once`` does, later; from 0.5.20 construction runs in C and cannot be hooked.

Targets (``sparsespec_sglang.compat`` names) and why:
- ``ServerArgs.add_cli_args`` (AFTER): adds the --sparsespec-* flags to the parser.
- ``ServerArgs.from_cli_args`` (AROUND): SGLang forwards only ServerArgs fields, so the parsed
  --sparsespec-* values are carried onto the record here.
- ``ServerArgs.__init__`` (BEFORE; while it is Python code): takes ``sparsespec_*`` keyword
  arguments of ``ServerArgs(...)`` and so of ``sglang.Engine(...)``.
- ``Engine.server_args_class`` (set while plugins load, once ``ServerArgs.__init__`` is not Python
  code): ``EngineServerArgs`` takes them from ``sglang.Engine(...)`` as it builds its record.
  ``new_server_args`` takes them on every release for a record built directly.
- ``run_resolution_pipeline`` (AROUND): just before SGLang resolves a record, refuses
  --sparsespec-* without SPARSESPEC (except --sparsespec-keep-retracted-kv, which is for servers
  without SPARSESPEC only and needs --enable-hierarchical-cache), then a bad SPARSESPEC flag value,
  then SPARSESPEC on a machine without CUDA or on another device (before SGLang's device probing
  fails with a stack trace); checks the user's
  attention backend and selects the plugin's before SGLang's device handlers and auto-selection
  decide it. Just after, keeps on the record the schedule the resolved settings imply and the
  ``SparseSpecConfig`` they make, built this once per record (``validation.record_config``).
- ``prepare_server_args`` (AROUND): turns a SparseSpecArgsError into one line on stderr and exit
  status 2 for ``python -m sglang.launch_server`` (and ``sglang serve``), and marks the record it
  returns as the command line's.
- ``ServerArgs.resolve_once`` (AROUND; where resolution is a later step): the same for a
  SparseSpecArgsError while the launcher resolves the command line's record.

Which of these a release needs is decided when the plugin registers (:func:`hooks`), not when this
module is imported.
"""

from __future__ import annotations

import argparse
import atexit
import contextvars
import sys
from typing import Any, Callable, NoReturn

from sparsespec_sglang import compat
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
from sparsespec_sglang.patches import register_hooks
from sparsespec_sglang.validation import (
    check_device,
    check_flag_values,
    is_sparsespec,
    record_config,
    select_attention_backend,
)

# Marks a record made by prepare_server_args: its errors are the command line's.
FROM_COMMAND_LINE_ATTR = "_sparsespec_from_command_line"

# The parsed --sparsespec-* values on their way from the ``from_cli_args`` hook to the
# ``ServerArgs.__init__`` hook, where construction is Python code (init_takes_keywords()). It must
# stay: SGLang's ``from_cli_args`` builds the record from its own fields only, and up to 0.5.18 the
# constructor resolves the record before ``from_cli_args`` returns, so the values have to be on it
# during that one constructor call, and SGLang passes no argument that could carry them. Set only
# by :func:`from_cli_args`, read only by :func:`init`, reset when that ``from_cli_args`` call
# returns or raises.
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


def take_keywords(kwargs: dict) -> dict:
    """Remove the ``sparsespec_*`` keyword arguments from ``kwargs`` and return those not None;
    an unknown ``sparsespec_*`` name is refused with one line."""
    values = {}
    for key in [k for k in kwargs if k.startswith("sparsespec_")]:
        if key not in OPTIONS_BY_DEST:
            allowed = ", ".join(sorted(OPTIONS_BY_DEST))
            raise SparseSpecArgsError(f"{ALGORITHM_NAME}: unknown keyword argument {key!r}; allowed: {allowed}")
        value = kwargs.pop(key)
        if value is not None:
            values[key] = value
    return values


def _with_values(server_args: Any, values: dict) -> Any:
    """``server_args`` with ``values`` on it: a record built without a Python ``__init__`` to hook
    (from 0.5.20), where construction does not resolve it either."""
    setattr(server_args, SERVER_ARGS_ATTR, values)
    return server_args


def new_server_args(**kwargs: Any) -> Any:
    """``ServerArgs(**kwargs)``, taking ``sparsespec_*`` keyword arguments on every SGLang release
    (from 0.5.20 ``ServerArgs`` itself refuses keywords that are not its fields)."""
    from sparsespec_sglang.compat import ServerArgs

    if compat.init_takes_keywords():
        return ServerArgs(**kwargs)  # the __init__ hook takes them
    values = take_keywords(kwargs)
    return _with_values(ServerArgs(**kwargs), values)


def from_cli_args(original: Callable, cls: type, args: argparse.Namespace) -> Any:
    values = {dest: getattr(args, dest) for dest in OPTIONS_BY_DEST if getattr(args, dest, None) is not None}
    if not compat.init_takes_keywords():
        return _with_values(original(cls, args), values)
    token = _cli_values.set(values)
    try:
        return original(cls, args)
    finally:
        _cli_values.reset(token)


def init(self: Any, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
    values = {**(_cli_values.get() or {}), **take_keywords(kwargs)}
    object.__setattr__(self, SERVER_ARGS_ATTR, values)
    return (self, *args), kwargs


class EngineServerArgs:
    """``Engine.server_args_class`` where ``ServerArgs`` refuses unknown keywords (from 0.5.20):
    builds SGLang's record from its own fields and keeps the ``sparsespec_*`` values on it. Set on
    the class while plugins load, which ``Engine.__init__`` does before it builds the record, so the
    first ``sglang.Engine(sparsespec_*=...)`` of a process takes them too (an ``Engine.__init__``
    hook would be installed only after that call began). Everything else reads through to
    ``ServerArgs``."""

    def __init__(self, server_args_class: Any) -> None:
        self.server_args_class = server_args_class

    def __call__(self, **kwargs: Any) -> Any:
        values = take_keywords(kwargs)
        return _with_values(self.server_args_class(**kwargs), values)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server_args_class, name)


def install_engine_keywords() -> None:
    engine = compat.resolve("Engine")
    if not isinstance(engine.__dict__.get("server_args_class"), EngineServerArgs):
        engine.server_args_class = EngineServerArgs(engine.server_args_class)


def check_before_resolution(server_args: Any) -> None:
    """The checks on the user's own values that must run before SGLang resolves them."""
    values = getattr(server_args, SERVER_ARGS_ATTR, None) or {}
    sparsespec = is_sparsespec(server_args)
    if not sparsespec:
        # An option with no SparseSpecConfig field (--sparsespec-keep-retracted-kv) is for
        # servers without SPARSESPEC; check_keep_retracted_kv validates it.
        refused = sorted(d for d in values if OPTIONS_BY_DEST[d].field is not None)
        if refused:
            flags = ", ".join(OPTIONS_BY_DEST[d].flag for d in refused)
            raise SparseSpecArgsError(
                f"{flags} need --speculative-algorithm {ALGORITHM_NAME} "
                f"(got {getattr(server_args, 'speculative_algorithm', None)!r})"
            )
    check_keep_retracted_kv(values.get(KEEP_RETRACTED_KV.dest), sparsespec=sparsespec,
                            hierarchical_cache=bool(getattr(server_args, "enable_hierarchical_cache", False)))
    if not sparsespec:
        return
    # The flag values first: a bad value is named on any machine, also one SPARSESPEC cannot run on.
    check_flag_values(server_args)
    device = getattr(server_args, "device", None)
    if device in (None, "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SparseSpecArgsError(
                f"{ALGORITHM_NAME}: needs a CUDA GPU (--device cuda), "
                "but torch.cuda.is_available() is False on this machine"
            )
    else:
        check_device(device)
    select_attention_backend(server_args)


def resolution(original: Callable, server_args: Any) -> Any:
    check_before_resolution(server_args)
    result = original(server_args)
    if is_sparsespec(server_args):
        record_config(server_args)
    return result


def _exit_with(error: SparseSpecArgsError) -> NoReturn:
    """One line on stderr and exit status 2: a usage error, never a stack trace. The line is
    written at interpreter exit, so that it stays the last one after the launcher's own shutdown
    logging (``sglang.launch_server`` resolves inside a ``try`` whose ``finally`` logs)."""
    atexit.register(print, f"error: {error}", file=sys.stderr)
    raise SystemExit(2) from None


def prepare_server_args(original: Callable, argv: list[str]) -> Any:
    try:
        server_args = original(argv)
    except SparseSpecArgsError as e:
        _exit_with(e)
    setattr(server_args, FROM_COMMAND_LINE_ATTR, True)
    return server_args


def resolve_once(original: Callable, server_args: Any) -> Any:
    try:
        return original(server_args)
    except SparseSpecArgsError as e:
        if getattr(server_args, FROM_COMMAND_LINE_ATTR, False):
            _exit_with(e)
        raise


HookTriple = tuple[str, Callable, Any]


def _error_hooks() -> tuple[HookTriple, ...]:
    """The launcher's one-line errors: ``prepare_server_args``, and ``resolve_once`` where
    resolution is a step after it (from 0.5.19)."""
    hooks: tuple[HookTriple, ...] = (("prepare_server_args", prepare_server_args, HookType.AROUND),)
    if not compat.resolves_on_construction():
        hooks += (("ServerArgs.resolve_once", resolve_once, HookType.AROUND),)
    return hooks


def hooks() -> tuple[HookTriple, ...]:
    """This module's hooks for the installed SGLang release."""
    keywords: tuple[HookTriple, ...] = (
        (("ServerArgs.__init__", init, HookType.BEFORE),) if compat.init_takes_keywords() else ())
    return (
        ("ServerArgs.add_cli_args", add_cli_args, HookType.AFTER),
        ("ServerArgs.from_cli_args", from_cli_args, HookType.AROUND),
        *keywords,
        ("run_resolution_pipeline", resolution, HookType.AROUND),
        *_error_hooks(),
    )


def register() -> None:
    register_hooks(hooks())
    if not compat.init_takes_keywords():
        install_engine_keywords()


def register_error_hook() -> None:
    """Only the launcher's one-line errors (on an SGLang release the plugin does not support): the
    hooks whose targets that release has."""
    register_hooks([h for h in _error_hooks() if _exists(h[0])])


def _exists(name: str) -> bool:
    try:
        compat.resolve(name)
    except (ImportError, AttributeError, compat.UnsupportedSGLangError):
        return False
    return True
