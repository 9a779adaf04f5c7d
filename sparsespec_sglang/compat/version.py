"""Which SGLang release is installed, and whether the plugin supports it."""

from __future__ import annotations

import functools
import importlib.metadata

from packaging.version import Version

from sparsespec_sglang.config import SparseSpecArgsError

# The supported range, inclusive (post releases of NEWEST included). pyproject.toml states the same
# range; tests/test_compat.py checks the two agree.
OLDEST = "0.5.17"
NEWEST = "0.5.23"


class UnsupportedSGLangError(SparseSpecArgsError):
    """The installed SGLang is outside OLDEST..NEWEST; the message is one line naming both."""


@functools.cache
def installed() -> Version:
    """The installed SGLang release (from its distribution metadata: importing it is not needed)."""
    return Version(importlib.metadata.version("sglang"))


def is_supported(version: Version) -> bool:
    return Version(OLDEST) <= Version(version.base_version) <= Version(NEWEST)


def check_supported(version: Version | None = None) -> None:
    """Raise :class:`UnsupportedSGLangError` unless ``version`` (default: installed) is supported."""
    version = installed() if version is None else version
    if not is_supported(version):
        raise UnsupportedSGLangError(
            f"sparsespec-sglang supports SGLang {OLDEST} to {NEWEST}, but SGLang {version} is "
            f"installed (pip install 'sglang>={OLDEST},<={NEWEST}')")


@functools.cache
def _parsed(release: str) -> Version:
    return Version(release)


def since(release: str) -> bool:
    """Whether the installed SGLang is ``release`` or newer (for this package's adapters only; some
    run on every decode step, so release strings are parsed once)."""
    return _parsed(installed().base_version) >= _parsed(release)
