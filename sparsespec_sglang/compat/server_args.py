"""SGLang internals of server arguments: the CLI, ``ServerArgs``, its resolution and validation hooks.

How SGLang builds and resolves a ``ServerArgs`` changed twice:

- up to 0.5.18 it is a dataclass that resolves itself in ``__post_init__`` (0.5.17's handlers write
  the fields, its declarations are applied to them at the end);
- 0.5.19 constructs it raw and resolves it later, once, in ``resolve_once``
  (``arg_groups.pipeline.run_resolution_pipeline``); handlers declare their decisions in a stash
  instead of writing fields, and an algorithm's ``validate_server_args`` is handed the record;
- from 0.5.20 it is a msgspec Struct: construction runs in C (a Python ``__init__`` or
  ``__post_init__`` set on the class is never called, unknown keywords are a TypeError), the record
  refuses field writes while it is resolved, and ``validate_server_args`` is handed a stand-in that
  reads through the declarations and turns field writes into declarations.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature or behaviour (see the package docstring).
"""

from __future__ import annotations

from typing import Any, Optional

from sparsespec_sglang.compat.version import since

_SA = "sglang.srt.server_args"
_OVERRIDES = "sglang.srt.arg_groups.overrides"
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "ServerArgs": (("0.5.17", f"{_SA}:ServerArgs"),),
    "ServerArgs.add_cli_args": (("0.5.17", f"{_SA}:ServerArgs.add_cli_args"),),
    "ServerArgs.from_cli_args": (("0.5.17", f"{_SA}:ServerArgs.from_cli_args"),),
    # Hooked only while it is Python code (init_takes_keywords()).
    "ServerArgs.__init__": (("0.5.17", f"{_SA}:ServerArgs.__init__"),),
    "Engine.__init__": (("0.5.17", "sglang.srt.entrypoints.engine:Engine.__init__"),),
    # Engine.__init__ calls load_plugins() and only then builds its record with
    # self.server_args_class(**kwargs): what the plugin sets there serves even the first Engine.
    "Engine": (("0.5.17", "sglang.srt.entrypoints.engine:Engine"),),
    # What resolves a record, called with it alone: once per record...
    "ServerArgs.resolve_once": (
        ("0.5.17", f"{_SA}:ServerArgs.__post_init__"),
        ("0.5.19", f"{_SA}:ServerArgs.resolve_once"),
    ),
    # ...and what runs SGLang's handlers over it (only when resolution really happens).
    "run_resolution_pipeline": (
        ("0.5.17", f"{_SA}:ServerArgs.__post_init__"),
        ("0.5.19", "sglang.srt.arg_groups.pipeline:run_resolution_pipeline"),
    ),
    "prepare_server_args": (("0.5.17", f"{_SA}:prepare_server_args"),),
    # The checkpoint's ModelConfig, called with the record (a view or stand-in from 0.5.19).
    "model_config_of": (
        ("0.5.17", f"{_SA}:ServerArgs.get_model_config"),
        ("0.5.19", f"{_OVERRIDES}:model_config_of"),
    ),
    "ATTENTION_BACKEND_CHOICES": (("0.5.17", f"{_SA}:ATTENTION_BACKEND_CHOICES"),),
    "DETERMINISTIC_ATTENTION_BACKEND_CHOICES": (("0.5.17", f"{_SA}:DETERMINISTIC_ATTENTION_BACKEND_CHOICES"),),
    "add_attention_backend_choices": (("0.5.17", f"{_SA}:add_attention_backend_choices"),),
    "attention_backends_of": (("0.5.17", f"{_OVERRIDES}:attention_backends_of"),),
    "resolved_view": (("0.5.17", f"{_OVERRIDES}:resolved_view"),),
    "get_server_args": (("0.5.17", "sglang.srt.runtime_context:get_server_args"),),
}

ADAPTERS = ("init_takes_keywords", "resolves_on_construction", "resolve_server_args", "resolving",
            "declare", "dp_attention")


def init_takes_keywords() -> bool:
    """Whether ``ServerArgs(**kwargs)`` runs a Python ``__init__`` that a hook can wrap (a dataclass
    up to 0.5.19); from 0.5.20 construction is msgspec's C code, so ``sparsespec_*`` keywords can
    only be taken before it (``sglang.Engine``) and values set on the record after it."""
    return not since("0.5.20")


def resolves_on_construction() -> bool:
    """Whether ``ServerArgs(...)`` also resolves the record (``__post_init__``, up to 0.5.18), so
    ``prepare_server_args`` returns it resolved; from 0.5.19 resolution is ``resolve_once``, which
    the launcher calls after ``prepare_server_args`` returned."""
    return not since("0.5.19")


def resolve_server_args(server_args: Any) -> None:
    """Resolve a constructed record as SGLang's launchers do (construction already did up to 0.5.18)."""
    if since("0.5.19"):
        server_args.resolve_once()


def resolving(server_args: Any) -> Any:
    """What SGLang's resolution has decided so far about the record (or stand-in) an algorithm's
    ``validate_server_args`` is handed, for reading: up to 0.5.18 the fields with the declarations
    not yet applied to them; 0.5.19 hands the raw record, read through its declarations; from 0.5.20
    the stand-in already reads through them."""
    from sglang.srt.server_args import ServerArgs

    if not isinstance(server_args, ServerArgs):
        return server_args
    if since("0.5.19"):
        from sglang.srt.arg_groups.overrides import resolving_view

        return resolving_view(server_args)
    from sglang.srt.arg_groups.overrides import resolved_view

    return resolved_view(server_args)


def declare(server_args: Any, source: str, **fields: Any) -> None:
    """Decide ``fields`` for a record SGLang is about to resolve: set them up to 0.5.18 (its
    handlers start from the fields); declare them from 0.5.19 (the raw input stays what the user
    asked for, and from 0.5.20 the record refuses field writes while it is resolved)."""
    if since("0.5.19"):
        from sglang.srt.arg_groups.overrides import declare_resolution

        declare_resolution(server_args, source, **fields)
    else:
        for name, value in fields.items():
            setattr(server_args, name, value)


def dp_attention(cfg: Any) -> Optional[tuple[str, str, Any]]:
    """(flag, its value that turns it off, its value) for the flag that turns data-parallel
    attention on in resolved settings ``cfg``, or None: ``--enable-dp-attention`` up to 0.5.21;
    from 0.5.22 ``--attn-dp-size`` (resolution turns the deprecated ``--enable-dp-attention`` into
    it and clears the old field)."""
    if since("0.5.22"):
        return ("--attn-dp-size", "1", cfg.attn_dp_size) if cfg.attn_dp_size > 1 else None
    return ("--enable-dp-attention", "off", True) if cfg.enable_dp_attention else None
