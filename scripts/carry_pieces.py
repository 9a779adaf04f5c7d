"""Split a file into pieces no larger than a transfer limit, and join them back, verified.

A developer tool for hosts that files reach only through transfers of limited size (see
docs/development.md): a model file larger than the limit travels as pieces across several transfers,
and a manifest with the sha256 of every piece and of the whole lets the receiving host prove the
reassembled file is intact.

    python scripts/carry_pieces.py split model.gguf --first-piece-mib 8 --piece-mib 56 --out pieces
    python scripts/carry_pieces.py join pieces --out model.gguf
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

MIB = 1 << 20
_BUF = 4 * MIB
MANIFEST_SUFFIX = ".manifest.json"


class PieceError(Exception):
    """A user-facing failure: one line, no traceback."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_BUF):
            h.update(chunk)
    return h.hexdigest()


def piece_sizes(total: int, piece_bytes: int, first_piece_bytes: int | None = None) -> list[int]:
    """Sizes of the pieces of a ``total``-byte file: the first may differ so that it fits beside
    something else in the same transfer; the last holds the remainder. An empty file is one piece."""
    if piece_bytes <= 0 or (first_piece_bytes is not None and first_piece_bytes <= 0):
        raise PieceError("--piece-mib and --first-piece-mib must be > 0")
    sizes: list[int] = []
    left = total
    first = first_piece_bytes if first_piece_bytes is not None else piece_bytes
    while left > 0 or not sizes:
        n = min(left, first if not sizes else piece_bytes)
        sizes.append(n)
        left -= n
    return sizes


def split(src: Path, out_dir: Path, piece_bytes: int, first_piece_bytes: int | None = None) -> dict:
    """Write ``out_dir/<name>.partNN`` and ``out_dir/<name>.manifest.json``; return the manifest."""
    if not src.is_file():
        raise PieceError(f"split: no such file: {src}")
    sizes = piece_sizes(src.stat().st_size, piece_bytes, first_piece_bytes)
    out_dir.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    pieces = []
    with open(src, "rb") as f:
        for i, size in enumerate(sizes):
            name = f"{src.name}.part{i:02d}"
            h = hashlib.sha256()
            with open(out_dir / name, "wb") as g:
                left = size
                while left:
                    chunk = f.read(min(_BUF, left))
                    h.update(chunk)
                    whole.update(chunk)
                    g.write(chunk)
                    left -= len(chunk)
            pieces.append({"file": name, "size": size, "sha256": h.hexdigest()})
    manifest = {"name": src.name, "size": sum(sizes), "sha256": whole.hexdigest(), "pieces": pieces}
    (out_dir / f"{src.name}{MANIFEST_SUFFIX}").write_text(json.dumps(manifest, indent=1))
    return manifest


def _find_manifest(pieces_dir: Path, name: str | None) -> Path:
    if name:
        path = pieces_dir / f"{name}{MANIFEST_SUFFIX}"
        if not path.is_file():
            raise PieceError(f"join: missing manifest {path}")
        return path
    found = sorted(pieces_dir.glob(f"*{MANIFEST_SUFFIX}"))
    if len(found) != 1:
        raise PieceError(f"join: expected one *{MANIFEST_SUFFIX} in {pieces_dir}, found {len(found)} "
                         "(pass --name to pick one)")
    return found[0]


def join(pieces_dir: Path, out: Path, name: str | None = None) -> dict:
    """Check every piece against the manifest, concatenate, check the whole, then move it to ``out``
    (a failed join leaves no partial ``out`` behind)."""
    manifest = json.loads(_find_manifest(pieces_dir, name).read_text())
    for p in manifest["pieces"]:  # all pieces first: report the first bad one before writing anything
        path = pieces_dir / p["file"]
        if not path.is_file():
            raise PieceError(f"join: missing piece {path}")
        if path.stat().st_size != p["size"]:
            raise PieceError(f"join: corrupt piece {path}: {path.stat().st_size} bytes, manifest says {p['size']}")
        if _sha256_file(path) != p["sha256"]:
            raise PieceError(f"join: corrupt piece {path}: sha256 differs from the manifest")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".joining")
    whole = hashlib.sha256()
    with open(tmp, "wb") as g:
        for p in manifest["pieces"]:
            with open(pieces_dir / p["file"], "rb") as f:
                while chunk := f.read(_BUF):
                    whole.update(chunk)
                    g.write(chunk)
    if whole.hexdigest() != manifest["sha256"] or tmp.stat().st_size != manifest["size"]:
        tmp.unlink()
        raise PieceError(f"join: the joined file's sha256/size differs from the manifest's {manifest['name']}")
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("split", help="FILE -> OUT/<name>.partNN + OUT/<name>.manifest.json")
    sp.add_argument("file", type=Path)
    sp.add_argument("--piece-mib", type=float, required=True, help="size of every piece (MiB, may be fractional)")
    sp.add_argument("--first-piece-mib", type=float, default=None,
                    help="size of piece 00 (MiB), so it fits beside other files in one transfer")
    sp.add_argument("--out", type=Path, required=True)
    jp = sub.add_parser("join", help="DIR (pieces + manifest) -> FILE, every piece and the whole verified")
    jp.add_argument("dir", type=Path)
    jp.add_argument("--out", type=Path, required=True)
    jp.add_argument("--name", default=None, help="which file's manifest, when DIR holds several")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "split":
            first = None if args.first_piece_mib is None else int(args.first_piece_mib * MIB)
            m = split(args.file, args.out, int(args.piece_mib * MIB), first)
            for p in m["pieces"]:
                print(f"{args.out / p['file']}  {p['size']} bytes  sha256 {p['sha256'][:16]}")
            print(f"{len(m['pieces'])} pieces, {m['size']} bytes, sha256 {m['sha256']}")
        else:
            m = join(args.dir, args.out, args.name)
            print(f"joined {len(m['pieces'])} pieces -> {args.out} ({m['size']} bytes, sha256 verified)")
    except PieceError as e:
        print(f"carry_pieces: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
