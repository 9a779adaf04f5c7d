"""Which code produced a result: the commit and versions every results JSON records.

The GPU host runs a copy of the working tree whose ``.git`` can lag the checkout it came from, so a
run there names its commit through ``SPARSESPEC_COMMIT`` (set by the command that ships the tree);
elsewhere it is read from git, with ``-dirty`` when tracked files differ from it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def commit() -> str | None:
    """``$SPARSESPEC_COMMIT``, else ``git rev-parse --short HEAD`` (+ ``-dirty``), else None."""
    if os.environ.get("SPARSESPEC_COMMIT"):
        return os.environ["SPARSESPEC_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return None
    return (head + ("-dirty" if dirty else "")) or None


def versions() -> dict:
    """Python, torch, SGLang and transformers versions, the commit, and the GPU (None where absent)."""
    import platform

    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("sglang", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    out["commit"] = commit()
    out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return out
