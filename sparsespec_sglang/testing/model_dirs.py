"""Build small, self-contained Qwen3 model directories (no model hub needed).

`make_model_dir(path, shape)` writes a Hugging Face style directory that both
`transformers.AutoModelForCausalLM.from_pretrained` and SGLang can load:

    config.json               Qwen3ForCausalLM config ("tiny" or a real Qwen3 shape)
    generation_config.json    bos / eos / pad ids
    tokenizer.json            byte-level BPE tokenizer built with `tokenizers`
    tokenizer_config.json     special tokens + a minimal Qwen-style chat template
    model.safetensors         random weights (only with with_weights=True)

The big shapes ("qwen3-1.7b", "qwen3-8b", "qwen3-14b") carry the real Qwen3
architecture values and are meant for `--load-format dummy` in SGLang
(with_weights=False); writing their random weights on CPU is possible but slow
and large.

Tokenizer: a byte-level BPE (the GPT-2 / Qwen pre-tokenizer and decoder) whose
vocabulary holds the three Qwen special tokens, the 256 byte symbols (so any
ASCII / UTF-8 text is encodable), and filler tokens "<t{i}>" up to exactly
`config.vocab_size` entries. There are no merges, so encoding is one token per
byte; filler tokens are never produced by encoding but decode to their literal
text, so every id a model can emit is decodable. For the real Qwen3 shapes the
special tokens sit at Qwen's real ids (151643..151645).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

__all__ = ["SHAPES", "make_model_dir", "build_tokenizer"]

# Architecture values. The Qwen3 ones are copied from the released config.json files.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        # Random init with the usual 0.02 gives logits with std ~0.02*sqrt(64) ~ 0.16:
        # the next-token distribution is almost flat, so greedy decoding hits near-ties
        # whose winner flips under float32 reassociation noise (sparse vs dense kernels,
        # sdpa vs eager). With 0.5 the logits have std ~4 and the top-1/top-2 gap is
        # typically O(1), so greedy outputs are stable and "lossless" comparisons are
        # meaningful. (Attention itself stays non-trivial: Qwen3's q/k RMSNorm fixes the
        # q.k scale, so the attention pattern still depends on context.)
        initializer_range=0.5,
        special_ids={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
    ),
    # GPU end-to-end checks: SGLang/Triton-friendly head_dim 64, GQA 4, real (peaky) weights.
    "small": dict(
        num_hidden_layers=4,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=1024,
        max_position_embeddings=8192,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        initializer_range=0.25,  # peaky logits, as for "tiny" (std ~ 0.25 * sqrt(256) = 4)
        special_ids={"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2},
    ),
    "qwen3-1.7b": dict(
        num_hidden_layers=28,
        hidden_size=2048,
        intermediate_size=6144,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        initializer_range=0.02,
        special_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    ),
    "qwen3-8b": dict(
        num_hidden_layers=36,
        hidden_size=4096,
        intermediate_size=12288,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        special_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    ),
    "qwen3-14b": dict(
        num_hidden_layers=40,
        hidden_size=5120,
        intermediate_size=17408,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        tie_word_embeddings=False,
        initializer_range=0.02,
        special_ids={"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645},
    ),
}

BOS_TOKEN = "<|endoftext|>"  # also the pad token (Qwen convention)
EOS_TOKEN = "<|im_end|>"

# Qwen-style ChatML template (minimal: string contents, optional generation prompt).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tokenizer(vocab_size: int, special_ids: dict[str, int]):
    """A byte-level BPE `tokenizers.Tokenizer` with exactly `vocab_size` entries."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_symbols = list(pre_tokenizers.ByteLevel.alphabet())
    # Order the 256 byte symbols by byte value (GPT-2 bytes_to_unicode mapping) for readability.
    byte_symbols.sort(key=_byte_value)
    n_regular = vocab_size - len(special_ids)
    if n_regular < len(byte_symbols):
        raise ValueError(f"vocab_size {vocab_size} too small for 256 byte tokens + specials")
    regular = byte_symbols + [f"<t{i}>" for i in range(n_regular - len(byte_symbols))]
    vocab: dict[str, int] = {}
    it = iter(regular)
    by_id = {v: k for k, v in special_ids.items()}
    for idx in range(vocab_size):
        vocab[by_id[idx] if idx in by_id else next(it)] = idx
    assert len(vocab) == vocab_size

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Already in the vocab -> they keep their ids; registering them as special makes the
    # tokenizer split them out of raw text (the chat template emits them literally).
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_ids])
    return tok


def _byte_value(sym: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode for a single byte symbol."""
    return _unicode_to_byte()[sym]


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))


def _make_config(shape: str, dtype: str):
    from transformers import Qwen3Config

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    s = dict(SHAPES[shape])
    special_ids = s.pop("special_ids")
    rope_theta = s.pop("rope_theta")
    cfg = Qwen3Config(
        **s,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=s["num_hidden_layers"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        bos_token_id=special_ids[BOS_TOKEN],
        eos_token_id=special_ids[EOS_TOKEN],
        pad_token_id=special_ids[BOS_TOKEN],
        use_cache=True,
    )
    cfg.architectures = ["Qwen3ForCausalLM"]
    cfg.dtype = dtype
    return cfg, special_ids


def make_model_dir(
    path,
    shape: str = "tiny",
    *,
    with_weights: bool = True,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a loadable Qwen3ForCausalLM directory at `path` and return it as a Path.

    with_weights=True saves random weights (seeded, `dtype`) as safetensors; False writes
    only config + tokenizer (for SGLang `--load-format dummy`).
    """
    import torch
    from transformers import GenerationConfig

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg, special_ids = _make_config(shape, dtype)

    if with_weights:
        from transformers import Qwen3ForCausalLM

        torch_dtype = getattr(torch, dtype)
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)  # post_init() draws weights with initializer_range
        model.to(torch_dtype)
        model.config.dtype = dtype
        model.generation_config = GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        )
        model.save_pretrained(path)
    else:
        cfg.save_pretrained(path)
        GenerationConfig(
            bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id
        ).save_pretrained(path)

    tok = build_tokenizer(cfg.vocab_size, special_ids)
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": BOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": BOS_TOKEN}, indent=2) + "\n"
    )
    return path
