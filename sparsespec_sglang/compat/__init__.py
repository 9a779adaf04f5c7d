"""The one place that knows which SGLang release is installed.

SGLang's internals move between 0.5.x releases. Every SGLang internal the plugin imports, and every
SGLang function it hooks, is named once in this package with where it lives from which release on.
The rest of the plugin imports those names from here (``from sparsespec_sglang.compat import X``,
resolved on first use) and takes hook targets from :func:`hook_target`; ``tests/test_compat.py``
fails on any other ``sglang`` import in the plugin. Where a behaviour changed rather than a location
(a renamed argument, a new signature), a small adapter in one of this package's area modules
(``runtime``, ``server_args``, ``cache``, ``bench``) picks the release's form with :func:`since`.
Version checks live nowhere else.
"""

from __future__ import annotations

import importlib
from typing import Any

from packaging.version import Version

from sparsespec_sglang.compat import bench, cache, runtime, server_args
from sparsespec_sglang.compat.version import (  # noqa: F401  (the package's public names)
    NEWEST,
    OLDEST,
    UnsupportedSGLangError,
    check_supported,
    installed,
    is_supported,
    since,
)

AREAS = (runtime, server_args, cache, bench)
# name -> ((first release, "module:qualname"), ...) in release order, merged from the area modules.
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {}
for _area in AREAS:
    for _name, _where in _area.LOCATIONS.items():
        assert _name not in LOCATIONS, f"{_name} named twice in sparsespec_sglang.compat"
        LOCATIONS[_name] = _where


def location(name: str, version: Version | None = None) -> str:
    """``module:qualname`` of ``name`` in ``version`` (default: the installed SGLang)."""
    version = Version((installed() if version is None else version).base_version)
    found = [where for first, where in LOCATIONS[name] if Version(first) <= version]
    if not found:
        raise UnsupportedSGLangError(f"{name} is not in SGLang {version}")
    return found[-1]


def hook_target(name: str) -> str:
    """The dotted target SGLang's ``HookRegistry`` patches for ``name`` in the installed SGLang."""
    return location(name).replace(":", ".")


def resolve(name: str) -> Any:
    """The object ``name`` refers to in the installed SGLang (imports its module); a location with
    an empty qualname (``"sglang.benchmark.serving:"``) is the module itself."""
    module, qualname = location(name).split(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, qualname.split(".")):
        obj = getattr(obj, part)
    return obj


def __getattr__(name: str) -> Any:
    # ``from sparsespec_sglang.compat import ScheduleBatch``: SGLang modules are imported on first
    # use, so importing the plugin's entry point stays light in every SGLang process.
    if name in LOCATIONS:
        value = resolve(name)
        globals()[name] = value
        return value
    adapter = _adapter(name)
    if adapter is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return adapter


def _adapter(name: str) -> Any:
    for area in AREAS:
        if name in area.ADAPTERS:
            return getattr(area, name)
    return None
