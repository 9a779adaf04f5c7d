"""The compatibility layer: the supported range, where each SGLang internal lives by release, that the
plugin reaches SGLang only through it, and what a launch on an unsupported SGLang does."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from sparsespec_sglang import compat
from sparsespec_sglang.compat import version as compat_version
from test_plugin import _model_dir

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = ("sparsespec_sglang", "patches", "kernels")


@pytest.mark.parametrize("release, ok", [
    ("0.5.16", False), ("0.5.17", True), ("0.5.20", True), ("0.5.23", True), ("0.5.23.post1", True),
    ("0.5.24", False), ("0.6.0", False), ("0.5.17rc1", True)])
def test_supported_range(release, ok):
    assert compat.is_supported(Version(release)) is ok
    if ok:
        compat.check_supported(Version(release))
    else:
        with pytest.raises(compat.UnsupportedSGLangError) as e:
            compat.check_supported(Version(release))
        message = str(e.value)
        assert "\n" not in message
        assert f"SGLang {release}" in message and compat.OLDEST in message and compat.NEWEST in message


def test_pyproject_states_the_same_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (sglang,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "sglang"]
    for release in (compat.OLDEST, compat.NEWEST, f"{compat.NEWEST}.post1"):
        assert sglang.specifier.contains(release), release
    for release in ("0.5.16", "0.5.24"):
        assert not sglang.specifier.contains(release), release


def test_the_installed_release_is_supported():
    assert compat.is_supported(compat.installed())


def test_location_picks_the_newest_entry_not_after_the_release(monkeypatch):
    name = "create_flashinfer_kv_indices_triton"
    assert compat.location(name, Version("0.5.22")).startswith("sglang.kernels.ops.kvcache.")
    assert compat.location(name, Version("0.5.23")).startswith("sglang.kernels.ops.attention.")
    assert compat.location(name, Version("0.5.23.post2")).startswith("sglang.kernels.ops.attention.")
    with pytest.raises(compat.UnsupportedSGLangError):
        compat.location(name, Version("0.5.16"))
    monkeypatch.setattr(compat_version, "installed", lambda: Version("0.5.22"))
    assert not compat.since("0.5.23") and compat.since("0.5.22")


def test_every_location_resolves_in_the_installed_sglang():
    for name, entries in compat.LOCATIONS.items():
        assert [Version(r) for r, _ in entries] == sorted(Version(r) for r, _ in entries), name
        assert compat.resolve(name) is not None, name


def test_every_adapter_exists():
    for area in compat.AREAS:
        for name in area.ADAPTERS:
            assert callable(getattr(compat, name)), name


def _sglang_uses(path: Path) -> list[str]:
    """``file:line what`` for each SGLang import, SGLang dotted-path string and ``since(`` call."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        what = None
        if isinstance(node, ast.Import):
            what = next((a.name for a in node.names if a.name.split(".")[0] == "sglang"), None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "sglang":
            what = node.module
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("sglang."):
            what = node.value
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "since":
            what = "since()"
        if what:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {what}")
    return found


def test_the_plugin_reaches_sglang_only_through_compat():
    files = [p for d in PLUGIN_DIRS for p in (ROOT / d).rglob("*.py")
             if "compat" not in p.relative_to(ROOT).parts]
    assert len(files) > 20
    assert [u for p in files for u in _sglang_uses(p)] == []
    # The scan finds what it looks for.
    assert _sglang_uses(ROOT / "sparsespec_sglang" / "compat" / "runtime.py")


_FAKE_RELEASE = """
import importlib.metadata as md, runpy, sys
real = md.version
md.version = lambda name: {release!r} if name == "sglang" else real(name)
sys.argv = ["sglang.launch_server", *sys.argv[1:]]
runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
"""


def _launch_as(release: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FAKE_RELEASE.format(release=release), *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_a_sparsespec_launch_on_an_unsupported_sglang_stops_with_one_line(tmp_path):
    model = _model_dir(tmp_path, "Qwen3ForCausalLM")
    proc = _launch_as("0.5.99", "--model-path", model, "--device", "cpu",
                      "--speculative-algorithm", "SPARSESPEC")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: sparsespec-sglang supports SGLang {compat.OLDEST} to {compat.NEWEST}, but SGLang 0.5.99 "
        f"is installed (pip install 'sglang>={compat.OLDEST},<={compat.NEWEST}')")
