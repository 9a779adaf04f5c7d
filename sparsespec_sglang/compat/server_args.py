"""SGLang internals of server arguments: the CLI, ``ServerArgs`` and its validation hooks.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature (see the package docstring).
"""

from __future__ import annotations

_SA = "sglang.srt.server_args"
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "ServerArgs": (("0.5.17", f"{_SA}:ServerArgs"),),
    "ServerArgs.add_cli_args": (("0.5.17", f"{_SA}:ServerArgs.add_cli_args"),),
    "ServerArgs.from_cli_args": (("0.5.17", f"{_SA}:ServerArgs.from_cli_args"),),
    "ServerArgs.__init__": (("0.5.17", f"{_SA}:ServerArgs.__init__"),),
    "ServerArgs.__post_init__": (("0.5.17", f"{_SA}:ServerArgs.__post_init__"),),
    "prepare_server_args": (("0.5.17", f"{_SA}:prepare_server_args"),),
    "ATTENTION_BACKEND_CHOICES": (("0.5.17", f"{_SA}:ATTENTION_BACKEND_CHOICES"),),
    "DETERMINISTIC_ATTENTION_BACKEND_CHOICES": (("0.5.17", f"{_SA}:DETERMINISTIC_ATTENTION_BACKEND_CHOICES"),),
    "add_attention_backend_choices": (("0.5.17", f"{_SA}:add_attention_backend_choices"),),
    "attention_backends_of": (("0.5.17", "sglang.srt.arg_groups.overrides:attention_backends_of"),),
    "resolved_view": (("0.5.17", "sglang.srt.arg_groups.overrides:resolved_view"),),
    "get_server_args": (("0.5.17", "sglang.srt.runtime_context:get_server_args"),),
}

ADAPTERS: tuple[str, ...] = ()
