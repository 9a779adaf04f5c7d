"""scripts/carry_pieces.py: split/join round trip, piece sizes, and one-line errors for a missing or
corrupt piece (the file that reaches the GPU host must be byte-identical or refused)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "carry_pieces.py"
_spec = importlib.util.spec_from_file_location("carry_pieces", SCRIPT)
cp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cp)

KIB = 1024


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


@pytest.fixture()
def blob(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(os.urandom(10 * KIB + 123))
    return path


def test_piece_sizes_first_piece_differs_and_remainder_is_last():
    assert cp.piece_sizes(100, 30, 8) == [8, 30, 30, 30, 2]
    assert cp.piece_sizes(90, 30) == [30, 30, 30]
    assert cp.piece_sizes(0, 30) == [0]
    with pytest.raises(cp.PieceError):
        cp.piece_sizes(10, 0)


def test_split_join_round_trip_via_cli(blob: Path, tmp_path: Path):
    pieces = tmp_path / "pieces"
    mib = 1 << 20
    res = _cli("split", blob, "--first-piece-mib", 1 * KIB / mib, "--piece-mib", 4 * KIB / mib, "--out", pieces)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((pieces / "model.gguf.manifest.json").read_text())
    assert [p["size"] for p in manifest["pieces"]] == [1 * KIB, 4 * KIB, 4 * KIB, 1 * KIB + 123]
    assert [p["file"] for p in manifest["pieces"]] == [f"model.gguf.part{i:02d}" for i in range(4)]
    assert manifest["size"] == blob.stat().st_size
    joined = tmp_path / "back" / "model.gguf"
    res = _cli("join", pieces, "--out", joined)
    assert res.returncode == 0, res.stderr
    assert joined.read_bytes() == blob.read_bytes()


def test_missing_piece_is_named_in_one_line(blob: Path, tmp_path: Path):
    pieces = tmp_path / "pieces"
    cp.split(blob, pieces, 4 * KIB)
    (pieces / "model.gguf.part01").unlink()
    res = _cli("join", pieces, "--out", tmp_path / "out.gguf")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "missing piece" in res.stderr and "part01" in res.stderr
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_piece_is_named_and_nothing_is_written(blob: Path, tmp_path: Path, damage: str):
    pieces = tmp_path / "pieces"
    cp.split(blob, pieces, 4 * KIB)
    bad = pieces / "model.gguf.part02"
    data = bytearray(bad.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # same size, one bit off: only the sha256 can catch it
    else:
        data = data[:-1]
    bad.write_bytes(bytes(data))
    with pytest.raises(cp.PieceError, match=r"corrupt piece .*part02"):
        cp.join(pieces, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    assert not (tmp_path / "out.gguf.joining").exists()


def test_whole_checksum_guards_the_manifest(blob: Path, tmp_path: Path):
    """Pieces consistent with their own entries but not with the whole (e.g. a stale piece list)."""
    pieces = tmp_path / "pieces"
    cp.split(blob, pieces, 4 * KIB)
    path = pieces / "model.gguf.manifest.json"
    manifest = json.loads(path.read_text())
    manifest["sha256"] = "0" * 64
    path.write_text(json.dumps(manifest))
    with pytest.raises(cp.PieceError, match="joined file"):
        cp.join(pieces, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_split_missing_file_is_one_line(tmp_path: Path):
    res = _cli("split", tmp_path / "nope.gguf", "--piece-mib", 1, "--out", tmp_path / "p")
    assert res.returncode == 2 and "no such file" in res.stderr and "Traceback" not in res.stderr
