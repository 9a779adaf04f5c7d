"""The paper's serving workload (SparseSpec, arXiv 2512.01278), seeded, and its replay through
SGLang's own ``bench_serving``.

Why a generator: the paper measures long reasoning outputs at saturation -- prompts of ~124-148
tokens, outputs of 13,185 +/- 7,626 tokens, ~2048 requests, batch up to 256 -- and SGLang's
``--dataset-name random`` cannot express that (its output lengths are uniform in
``[ratio * L, L]``). So this module draws the lengths itself:

* prompt lengths uniform in ``[124, 148]`` (random token ids, or the real prompts of a JSONL
  file tokenised with the model's tokenizer), output lengths from N(13185, 7626) clipped to
  ``[1024, 32768]`` (or one fixed length); every request runs with ``ignore_eos``.
* :func:`mid_run` derives the *steady-state* shape: the contexts a saturated server holds
  mid-run. A request present at a random instant was picked in proportion to its output length
  (longer requests stay longer) and sits at a uniform fraction of its output, so it becomes a
  prompt of ``prompt + done`` tokens that still has ``output - done`` tokens to generate.

Replay: SGLang's ``bench_serving`` CLI (0.5.17 to 0.5.23) has no dataset format with exact per-request
prompt *and* output lengths (``random`` is uniform, ``custom`` takes the output length from a
tokenised answer, ``openai`` takes ``max_tokens`` per line but re-tokenises text prompts). So
:func:`replay` calls bench_serving's own ``benchmark()`` coroutine with one ``DatasetRow`` per
request whose prompt is the token-id list (backend ``sglang``: ``/generate`` with
``input_ids``, ``max_new_tokens`` = the request's output length). ``--format openai`` also
writes the ``openai`` dataset file for ``python -m sglang.benchmark.serving --backend
sglang-oai-chat --dataset-name openai`` (exact output lengths, re-tokenised prompts).

    python scripts/workload.py generate --out w.jsonl --num-requests 2048 --model-dir DIR
    python scripts/workload.py replay --workload w.jsonl --base-url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

# The paper's workload (arXiv 2512.01278: its AIME / OlympiadBench / LiveCodeBench traces).
PROMPT_LEN_RANGE = (124, 148)
OUTPUT_MEAN, OUTPUT_STD = 13185, 7626
OUTPUT_CLIP = (1024, 32768)
PAPER_TEMPERATURE = 0.6
# Random prompt ids stay clear of the low ids (bytes, specials in the test tokenizers) and of the
# top of the vocabulary (Qwen's special tokens sit at 151643+); small test vocabularies keep
# their middle half.
RANDOM_ID_MARGIN = 1000
PROMPT_KEYS = ("prompt", "text", "question", "problem")


@dataclass(frozen=True)
class Request:
    """One request: exact prompt ids and the exact number of tokens to generate (ignore_eos).

    ``kind`` is ``fresh`` (a new request of the workload) or ``mid-run`` (a steady-state
    request: ``done`` of its ``full_output_len`` tokens already folded into the prompt)."""

    input_ids: list[int]
    output_len: int
    kind: str = "fresh"
    full_output_len: Optional[int] = None
    done: int = 0

    @property
    def prompt_len(self) -> int:
        return len(self.input_ids)

    @property
    def context_len(self) -> int:
        """KV tokens this request holds once it has finished (prompt + output)."""
        return self.prompt_len + self.output_len


def output_lengths(n: int, rng: np.random.Generator, *, mean: float = OUTPUT_MEAN,
                   std: float = OUTPUT_STD, clip: tuple[int, int] = OUTPUT_CLIP,
                   fixed: Optional[int] = None) -> np.ndarray:
    """``n`` output lengths: N(mean, std) rounded and clipped to ``clip``, or all ``fixed``."""
    if fixed is not None:
        return np.full(n, int(fixed), dtype=np.int64)
    return np.clip(np.rint(rng.normal(mean, std, size=n)), clip[0], clip[1]).astype(np.int64)


def random_id_range(vocab_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ids random prompts draw from."""
    margin = min(RANDOM_ID_MARGIN, vocab_size // 4)
    if vocab_size < 8:
        raise ValueError(f"vocab_size {vocab_size} is too small for random prompts")
    return margin, vocab_size - margin


def random_prompts(n: int, rng: np.random.Generator, vocab_size: int,
                   length_range: tuple[int, int] = PROMPT_LEN_RANGE) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths uniform in ``length_range`` (inclusive)."""
    lo, hi = random_id_range(vocab_size)
    lens = rng.integers(length_range[0], length_range[1] + 1, size=n)
    return [rng.integers(lo, hi, size=int(k)).tolist() for k in lens]


def text_prompts(path: Path, tokenizer: Any, n: int) -> list[list[int]]:
    """``n`` prompts tokenised from a JSONL file (one of the keys ``prompt``/``text``/``question``/
    ``problem`` per line, or ``messages``), cycling through the file; chat-templated when the
    tokenizer has a template, as a reasoning model is served."""
    texts = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        messages = row.get("messages")
        if messages is None:
            key = next((k for k in PROMPT_KEYS if k in row), None)
            if key is None:
                raise ValueError(f"{path}: a line has none of the keys messages, {', '.join(PROMPT_KEYS)}")
            messages = [{"role": "user", "content": row[key]}]
        texts.append(messages)
    if not texts:
        raise ValueError(f"{path}: no prompts")
    ids = []
    for messages in texts:
        if getattr(tokenizer, "chat_template", None):
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids.append(list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out))
        else:
            ids.append(tokenizer.encode("\n".join(m["content"] for m in messages)))
    return [list(ids[i % len(ids)]) for i in range(n)]


def make_workload(n: int, *, seed: int = 0, vocab_size: int = 151936,
                  fixed_output_len: Optional[int] = None,
                  prompts: Optional[Sequence[Sequence[int]]] = None,
                  output_mean: float = OUTPUT_MEAN, output_std: float = OUTPUT_STD,
                  output_clip: tuple[int, int] = OUTPUT_CLIP) -> list[Request]:
    """The paper's workload: ``n`` fresh requests (random-id prompts unless ``prompts`` given)."""
    if n < 1:
        raise ValueError(f"--num-requests must be >= 1 (got {n})")
    rng = np.random.default_rng(seed)
    outs = output_lengths(n, rng, mean=output_mean, std=output_std, clip=output_clip,
                          fixed=fixed_output_len)
    ids = [list(p) for p in prompts[:n]] if prompts is not None else random_prompts(n, rng, vocab_size)
    if len(ids) < n:
        raise ValueError(f"{len(ids)} prompts for {n} requests")
    return [Request(input_ids=p, output_len=int(o)) for p, o in zip(ids, outs)]


def mid_run(workload: Sequence[Request], n: int, *, seed: int = 0, vocab_size: int = 151936) -> list[Request]:
    """``n`` steady-state requests: what a saturated server serving ``workload`` holds mid-run.

    Each draw picks a workload request with probability proportional to its output length (a
    request is in the running batch for a time proportional to its output), then a uniform
    fraction of that output as already generated: the prompt grows by ``done`` random ids and the
    request still generates ``output_len - done`` (>= 1) tokens."""
    outs = np.array([r.output_len for r in workload], dtype=np.float64)
    cdf = np.cumsum(outs) / outs.sum()
    lo, hi = random_id_range(vocab_size)
    reqs = []
    for j in range(n):
        # One generator per draw: the first m of n draws equal the m draws of a shorter list, so
        # servers with different pool sizes replay the same requests, only more or fewer of them.
        rng = np.random.default_rng([seed, 1, j])
        base = workload[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(workload) - 1)]
        done = min(int(rng.random() * base.output_len), base.output_len - 1)
        filler = rng.integers(lo, hi, size=done).tolist()
        reqs.append(Request(input_ids=base.input_ids + filler, output_len=base.output_len - done,
                            kind="mid-run", full_output_len=base.output_len, done=done))
    return reqs


def steady_state(workload: Sequence[Request], num_mid_run: int, *, seed: int = 0,
                 vocab_size: int = 151936) -> list[Request]:
    """``num_mid_run`` mid-run requests (they fill the KV pool right after prefill) followed by
    the workload's own fresh requests, which replace finished ones as a saturated server would."""
    return mid_run(workload, num_mid_run, seed=seed, vocab_size=vocab_size) + list(workload)


def mid_run_mean_context(workload: Sequence[Request]) -> float:
    """Expected KV tokens of a mid-run request: mean prompt + E[o^2] / (2 E[o]) (length-biased
    pick, uniform fraction), weighting prompts by output length as :func:`mid_run` does."""
    outs = np.array([r.output_len for r in workload], dtype=np.float64)
    prompts = np.array([r.prompt_len for r in workload], dtype=np.float64)
    return float((prompts * outs).sum() / outs.sum() + (outs ** 2).sum() / (2 * outs.sum()))


def batch_context_skew(workload: Sequence[Request], batch: int, *, draws: int = 2000, seed: int = 0) -> dict:
    """How unequal the contexts of one running batch are at steady state: ``draws`` batches of
    ``batch`` mid-run requests (drawn as :func:`mid_run` draws them, without the filler ids),
    and the quantiles of max / mean context over them. A kernel that gives every request the
    same work takes as long as the longest request's share, about this factor over the mean."""
    outs = np.array([r.output_len for r in workload], dtype=np.float64)
    prompts = np.array([r.prompt_len for r in workload], dtype=np.float64)
    cdf = np.cumsum(outs) / outs.sum()
    rng = np.random.default_rng([seed, 2])
    idx = np.minimum(np.searchsorted(cdf, rng.random((draws, batch)), side="right"), len(workload) - 1)
    ctx = prompts[idx] + np.minimum(np.floor(rng.random((draws, batch)) * outs[idx]), outs[idx] - 1)
    ratio = ctx.max(axis=1) / ctx.mean(axis=1)
    return {"batch": batch, "draws": draws, "mean_context": float(ctx.mean()),
            "max_over_mean": {q: float(np.quantile(ratio, f)) for q, f in (("p10", 0.1), ("median", 0.5),
                                                                             ("p90", 0.9))}}


def summary(reqs: Sequence[Request]) -> dict:
    """Length statistics of a request list (for the result JSON)."""
    p = np.array([r.prompt_len for r in reqs])
    o = np.array([r.output_len for r in reqs])
    return {"num_requests": len(reqs), "prompt_len_mean": float(p.mean()), "prompt_len_min": int(p.min()),
            "prompt_len_max": int(p.max()), "output_len_mean": float(o.mean()),
            "output_len_std": float(o.std()), "output_len_min": int(o.min()), "output_len_max": int(o.max()),
            "num_mid_run": sum(r.kind == "mid-run" for r in reqs)}


def write_jsonl(reqs: Iterable[Request], path: Path) -> None:
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps(asdict(r)) + "\n")


def read_jsonl(path: Path) -> list[Request]:
    return [Request(**json.loads(line)) for line in Path(path).read_text().splitlines() if line.strip()]


def write_openai_dataset(reqs: Iterable[Request], path: Path, tokenizer: Any,
                         temperature: float = PAPER_TEMPERATURE) -> None:
    """bench_serving's ``openai`` dataset: one chat request per line with its own ``max_tokens``
    and ``ignore_eos``. Prompts are decoded to text, so the server re-tokenises them (lengths
    approximate); output lengths are exact."""
    with open(path, "w") as f:
        for r in reqs:
            f.write(json.dumps({"messages": [{"role": "user", "content": tokenizer.decode(r.input_ids)}],
                                "max_tokens": r.output_len, "ignore_eos": True,
                                "temperature": temperature}) + "\n")


def bench_serving_args(*, temperature: float, num_prompts: int, output_file: Optional[str]) -> argparse.Namespace:
    """The globals bench_serving's ``benchmark()`` and its ``sglang`` request function read
    (``run_benchmark`` sets them from its CLI; a replay without that CLI sets them here)."""
    return argparse.Namespace(
        backend="sglang", dataset_name="sparsespec-workload", num_prompts=num_prompts,
        temperature=temperature, top_p=1.0, disable_ignore_eos=False,
        # Non-streaming: one response per request. SGLang's /generate stream resends the whole
        # text so far in every chunk, which for 13K-token outputs would load the client, not the server.
        disable_stream=True, return_logprob=False, return_routed_experts=False, logprob_start_len=-1,
        top_logprobs_num=0, token_ids_logprob=None, warmup_requests=1, plot_throughput=False,
        cache_report=False, output_details=False, output_file=output_file, profile_steps=None,
        profile_start_step=None, mooncake_num_rounds=1, sharegpt_output_len=None, random_input_len=None,
        random_output_len=None, random_range_ratio=None, image_count=None, image_resolution=None,
        flush_cache=False, goodput=None)  # goodput (SLO report, read from SGLang 0.5.23 on): off


def dataset_rows(reqs: Sequence[Request]) -> list:
    """bench_serving ``DatasetRow``s: token-id prompts, exact output lengths."""
    from sparsespec_sglang.compat import DatasetRow

    return [DatasetRow(prompt=r.input_ids, prompt_len=r.prompt_len, output_len=r.output_len) for r in reqs]


def _allow_without_hf_datasets() -> None:
    """bench_serving's dataset registry imports Hugging Face ``datasets`` at module level for its
    hub-backed loaders (MMMU and others), which replay never calls: it hands ``benchmark()`` its own
    rows. Where the package is absent (an SGLang install without its optional packages), a stand-in module
    lets the import succeed, and any loader that would really need it fails with one line."""
    try:
        import datasets  # noqa: F401
        return
    except ImportError:
        pass

    def load_dataset(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("this bench_serving dataset needs the Hugging Face `datasets` package: pip install datasets")

    stand_in = types.ModuleType("datasets")
    stand_in.load_dataset = load_dataset  # type: ignore[attr-defined]
    sys.modules["datasets"] = stand_in


def replay(reqs: Sequence[Request], base_url: str, *, temperature: float = PAPER_TEMPERATURE,
           max_concurrency: Optional[int] = None, output_file: Optional[str] = None,
           tokenizer: Any = None) -> dict:
    """Send every request at once (request rate inf) through bench_serving's ``benchmark()``
    against an SGLang server's ``/generate``; returns bench_serving's result dict."""
    _allow_without_hf_datasets()
    from sparsespec_sglang.compat import bench_serving as serving
    from sparsespec_sglang.compat import set_ulimit

    set_ulimit()  # one connection per request: thousands of open sockets
    serving.set_global_args(bench_serving_args(temperature=temperature, num_prompts=len(reqs),
                                               output_file=output_file))
    return asyncio.run(serving.benchmark(
        backend="sglang", api_url=f"{base_url}/generate", base_url=base_url, model_id="default",
        tokenizer=tokenizer, input_requests=dataset_rows(reqs), request_rate=float("inf"),
        max_concurrency=max_concurrency, disable_tqdm=False, lora_names=None,
        lora_request_distribution=None, lora_zipf_alpha=None, extra_request_body={}, profile=False))


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def server_tokenizer(base_url: str) -> Any:
    """The tokenizer the server loaded (bench_serving counts retokenised output with it)."""
    import requests

    info = requests.get(f"{base_url}/model_info", timeout=30).json()
    return _load_tokenizer(info.get("tokenizer_path") or info["model_path"])


def _vocab_size(model_dir: Optional[str], default: int) -> int:
    if model_dir is None:
        return default
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("generate", help="write a workload file")
    gen.add_argument("--out", required=True)
    gen.add_argument("--num-requests", type=int, default=2048)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--model-dir", default=None,
                     help="model directory: its vocab_size bounds random ids, its tokenizer reads --prompts")
    gen.add_argument("--vocab-size", type=int, default=151936, help="without --model-dir")
    gen.add_argument("--prompts", default=None,
                     help="JSONL of real prompts (e.g. benchmarks/prompts/reasoning_prompts.jsonl); "
                          "needs --model-dir for its tokenizer")
    gen.add_argument("--fixed-output-len", type=int, default=None,
                     help="every request generates this many tokens (default: the paper's distribution)")
    gen.add_argument("--mid-run", type=int, default=0,
                     help="prepend this many steady-state (mid-run) requests")
    gen.add_argument("--format", choices=("tokens", "openai"), default="tokens",
                     help="tokens: this module's JSONL (exact lengths, for replay); openai: "
                          "bench_serving's --dataset-name openai file (needs --model-dir)")
    gen.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE, help="openai format only")
    rep = sub.add_parser("replay", help="send a workload file to a server through bench_serving")
    rep.add_argument("--workload", required=True)
    rep.add_argument("--base-url", default="http://127.0.0.1:30000")
    rep.add_argument("--temperature", type=float, default=PAPER_TEMPERATURE)
    rep.add_argument("--max-concurrency", type=int, default=None)
    rep.add_argument("--output-file", default=None, help="bench_serving's result JSONL")
    args = ap.parse_args(argv)

    if args.cmd == "generate":
        if args.num_requests < 1:
            ap.error(f"--num-requests must be >= 1 (got {args.num_requests})")
        if args.fixed_output_len is not None and args.fixed_output_len < 1:
            ap.error(f"--fixed-output-len must be >= 1 (got {args.fixed_output_len})")
        if (args.prompts or args.format == "openai") and args.model_dir is None:
            ap.error("--prompts and --format openai need --model-dir (its tokenizer)")
        tokenizer = _load_tokenizer(args.model_dir) if args.model_dir else None
        vocab = _vocab_size(args.model_dir, args.vocab_size)
        prompts = text_prompts(Path(args.prompts), tokenizer, args.num_requests) if args.prompts else None
        reqs = make_workload(args.num_requests, seed=args.seed, vocab_size=vocab,
                             fixed_output_len=args.fixed_output_len, prompts=prompts)
        if args.mid_run:
            reqs = steady_state(reqs, args.mid_run, seed=args.seed, vocab_size=vocab)
        if args.format == "openai":
            write_openai_dataset(reqs, Path(args.out), tokenizer, args.temperature)
        else:
            write_jsonl(reqs, Path(args.out))
        print(json.dumps(summary(reqs)))
        return 0

    reqs = read_jsonl(Path(args.workload))
    base_url = args.base_url.rstrip("/")
    result = replay(reqs, base_url, temperature=args.temperature, max_concurrency=args.max_concurrency,
                    output_file=args.output_file, tokenizer=server_tokenizer(base_url))
    print(json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
