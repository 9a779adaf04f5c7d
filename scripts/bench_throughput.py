"""GPU throughput benchmark: plain decoding vs NGRAM vs SPARSESPEC, side by side, one process.

Random weights make acceptance meaningless, so speculative runs use a *forced acceptance*:
SGLang's own benchmark-only environment variable ``SGLANG_SIMULATE_ACC_LEN`` (read by
``eagle_sample``, which both NGRAM and SPARSESPEC verify through) fixes the accepted length
per cycle. It is not a server flag; this script sets it only for the speculative engines and
prints a warning line for every run that uses it.

Every size option takes a comma list and the script measures the whole grid: one engine per
(run, forced acceptance) -- SGLang reads the variable once per process -- sized for the largest
batch, then every (batch, input length, output length) point on it, each with its own prompts
(distinct seeds, so no point hits another's prefix cache). Speculative runs sweep every
``--forced-accept`` value (1..k+1; 1 = every draft rejected), plain runs once.

    python scripts/bench_throughput.py --shape qwen3-8b --batch 32,64,128 --input-len 512 \
        --output-len 4096 --forced-accept 7 --runs plain,ngram,sparsespec --out bench.json
    python scripts/bench_throughput.py --batch 64 --output-len 2048 --forced-accept 1,3,5,7,9 \
        --runs plain,sparsespec --out sweep_accept.json          # break-even acceptance
    python scripts/plot_results.py bench.json sweep_accept.json --out-dir plots/
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from sparsespec_sglang.testing import provenance

RUNS = ("plain", "plain-flashinfer", "plain-hicache", "ngram", "sparsespec", "sparsespec-draftnorm", "sparsespec-draftnorm-hicache",
        "sparsespec-unified", "sparsespec-draftnorm-unified", "sparsespec-draftnorm-unified-nodelay",
        "sparsespec-unified-adaptive", "sparsespec-unified-adaptive-flashinfer")


@contextlib.contextmanager
def _engine(name: str, model_dir: str, args: argparse.Namespace, max_batch: int,
            forced_accept: float | None, profile_path: Path | None, **kwargs) -> Iterator:
    import sglang as sgl

    if forced_accept is not None:
        os.environ["SGLANG_SIMULATE_ACC_LEN"] = str(forced_accept)
        print(f"WARNING [{name}]: benchmark-only forced acceptance SGLANG_SIMULATE_ACC_LEN="
              f"{forced_accept} (outputs are not the model's)", flush=True)
    else:
        os.environ.pop("SGLANG_SIMULATE_ACC_LEN", None)
    if profile_path is not None:
        kwargs["sparsespec_profile"] = str(profile_path)
    if args.max_total_tokens:
        kwargs["max_total_tokens"] = args.max_total_tokens
    engine = sgl.Engine(model_path=model_dir, load_format="dummy", skip_tokenizer_init=True,
                        mem_fraction_static=args.mem_fraction, disable_prefill_cuda_graph=True,
                        max_running_requests=max_batch,
                        cuda_graph_max_bs_decode=args.cuda_graph_bs or max_batch,
                        log_level=args.log_level, **kwargs)
    try:
        # Warm-up (JIT kernels, allocator) outside every timed point.
        engine.generate(input_ids=[[1000 + i] * 16 for i in range(4)],
                        sampling_params={"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True})
        yield engine
    finally:
        engine.shutdown()
        os.environ.pop("SGLANG_SIMULATE_ACC_LEN", None)


def _measure(engine, prompts: list[list[int]], output_len: int) -> dict:
    sampling = {"temperature": 0.0, "max_new_tokens": output_len, "ignore_eos": True}
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=sampling)
    elapsed = time.perf_counter() - start
    metas = [o["meta_info"] for o in outs]
    tokens = sum(m["completion_tokens"] for m in metas)
    latencies = sorted(m.get("e2e_latency", elapsed) for m in metas)
    accept = [m["spec_accept_length"] for m in metas if "spec_accept_length" in m]
    return {"output_tokens": tokens, "seconds": elapsed, "output_tok_per_s": tokens / elapsed,
            "latency_p50_s": latencies[len(latencies) // 2], "latency_max_s": latencies[-1],
            "retractions": sum(m.get("num_retractions", 0) for m in metas),
            "mean_accept_length": sum(accept) / len(accept) if accept else None}


def _prompts(batch: int, input_len: int, vocab: int, seed: int, long_input_len: int | None = None,
             long_share: float = 0.0) -> list[list[int]]:
    """``batch`` random prompts of ``input_len`` tokens; with ``long_input_len``, a random
    ``long_share`` of them (rounded) that long instead: a batch mixing short and long contexts."""
    rng = random.Random(seed)
    num_long = round(long_share * batch) if long_input_len else 0
    long = set(rng.sample(range(batch), num_long))
    return [[rng.randrange(1000, vocab - 1000) for _ in range(long_input_len if i in long else input_len)]
            for i in range(batch)]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def add_speedups(points: list[dict]) -> None:
    """``speedup_vs_plain`` on every point that has a plain point of the same shape measured in
    the same run (``source``, when points from several result files are mixed)."""
    key = lambda p: (p.get("source"), p["batch"], p["input_len"], p["output_len"],  # noqa: E731
                     p.get("long_input_len"), p.get("long_share"))
    plain = {key(p): p["output_tok_per_s"] for p in points if p["run"] == "plain"}
    for p in points:
        base = plain.get(key(p))
        if base:
            p["speedup_vs_plain"] = p["output_tok_per_s"] / base


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--batch", type=_ints, default=[32], help="comma list of batch sizes")
    ap.add_argument("--input-len", type=_ints, default=[512], help="comma list of prompt lengths")
    ap.add_argument("--output-len", type=_ints, default=[1024], help="comma list of output lengths")
    ap.add_argument("--long-input-len", type=int, default=None,
                    help="a mixed batch: --long-share of each batch's prompts have this many tokens "
                         "instead of --input-len (e.g. half short, half long contexts)")
    ap.add_argument("--long-share", type=float, default=0.5,
                    help="share of the batch with --long-input-len prompts (default %(default)s)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--forced-accept", type=_floats, default=[7.0],
                    help="comma list of accepted tokens per cycle incl. the bonus, 1..k+1 "
                         "(7 = 6 of 8 drafts); speculative runs sweep all of them")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="cap every engine's KV pool (tokens), e.g. to half the batch's final KV to "
                         "compare SGLang's retract-and-recompute with the HiCache run")
    ap.add_argument("--runs", default="plain,ngram,sparsespec",
                    help="comma list of: " + ", ".join(RUNS))
    ap.add_argument("--profile", action="store_true",
                    help="SPARSESPEC runs record per-cycle GPU phase times (--sparsespec-profile; syncs)")
    ap.add_argument("--log-level", default="warning",
                    help="engine log level; 'info' adds SGLang's per-interval decode lines "
                         "(running requests, KV usage, tok/s) and the SPARSESPEC cycle means")
    ap.add_argument("--cuda-graph-bs", type=int, default=None,
                    help="largest CUDA-graph batch (default: the largest --batch)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    names = args.runs.split(",")
    bad = [n for n in names if n not in RUNS]
    if bad:
        ap.error(f"--runs: unknown {', '.join(bad)}; allowed: {', '.join(RUNS)}")
    if args.long_input_len is not None and args.long_input_len < 1:
        ap.error(f"--long-input-len must be a positive number of tokens (got {args.long_input_len})")
    if not 0 < args.long_share <= 1:
        ap.error(f"--long-share must be in (0, 1] (got {args.long_share})")
    bad_fa = [a for a in args.forced_accept if not 1 <= a <= args.k + 1]
    if bad_fa:
        ap.error(f"--forced-accept: each value must be in [1, k+1 = {args.k + 1}] (got {bad_fa})")
    if not torch.cuda.is_available():
        ap.exit(2, "bench_throughput.py: needs a CUDA GPU (torch.cuda.is_available() is False on this machine)\n")

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape,
                                   with_weights=False, dtype="bfloat16"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    shapes = list(itertools.product(args.batch, args.input_len, args.output_len))
    spec = dict(speculative_num_steps=args.k)
    configs = {
        "plain": dict(attention_backend="triton"),
        # Plain SGLang with its fastest decode backend on Hopper: the baseline a user would run.
        "plain-flashinfer": dict(attention_backend="flashinfer"),
        # Plain decoding whose retracted requests keep their KV in HiCache's host pool (issue 6).
        "plain-hicache": dict(attention_backend="triton", enable_hierarchical_cache=True,
                              sparsespec_keep_retracted_kv=True),
        "ngram": dict(attention_backend="triton", speculative_algorithm="NGRAM",
                      speculative_num_draft_tokens=args.k + 1),
        # Lockstep draft/verify passes (run names without "unified"; the server default is unified).
        "sparsespec": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="lockstep", **spec),
        "sparsespec-draftnorm": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="lockstep",
                                     sparsespec_score_norm="draft", **spec),
        # Retracted requests' KV kept in HiCache's host pool instead of recomputed (issue 6).
        "sparsespec-draftnorm-hicache": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="lockstep",
                                             sparsespec_score_norm="draft", enable_hierarchical_cache=True,
                                             **spec),
        # Unified draft/verify passes (issue 5), and the same with the host waiting for every
        # pass's verify results (the delayed-verification ablation).
        "sparsespec-unified": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="unified", **spec),
        "sparsespec-draftnorm-unified": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="unified",
                                             sparsespec_score_norm="draft", **spec),
        "sparsespec-draftnorm-unified-nodelay": dict(
            speculative_algorithm="SPARSESPEC", sparsespec_schedule="unified", sparsespec_score_norm="draft",
            sparsespec_disable_delayed_verify=True, **spec),
        # Each request speculates or decodes densely, chosen per step (adaptive speculation).
        "sparsespec-unified-adaptive": dict(speculative_algorithm="SPARSESPEC", sparsespec_schedule="unified",
                                            sparsespec_adaptive="on", **spec),
        # ... with its all-dense steps on SGLang's FlashInfer backend.
        "sparsespec-unified-adaptive-flashinfer": dict(
            speculative_algorithm="SPARSESPEC", sparsespec_schedule="unified", sparsespec_adaptive="on",
            sparsespec_dense_backend="flashinfer", **spec),
    }
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "versions": provenance.versions(), "shape": args.shape, "k": args.k,
              "max_total_tokens": args.max_total_tokens, "points": []}
    num_engines = sum(len(args.forced_accept) if configs[n].get("speculative_algorithm") else 1 for n in names)
    progress = tqdm(total=num_engines * len(shapes), unit="point", desc="bench_throughput", disable=args.quiet)
    for name in names:
        algorithm = configs[name].get("speculative_algorithm")  # speculative runs take the sweep
        for forced in (args.forced_accept if algorithm else [None]):
            profile_path = (Path(tempfile.mkdtemp()) / "cycles.json"
                            if args.profile and algorithm == "SPARSESPEC" else None)
            with _engine(name, model_dir, args, max(args.batch), forced, profile_path,
                         **configs[name]) as engine:
                for i, (batch, input_len, output_len) in enumerate(shapes):
                    point = {"run": name, "batch": batch, "input_len": input_len,
                             "output_len": output_len, "forced_accept": forced,
                             "engine_kwargs": configs[name]}
                    if args.long_input_len:
                        point.update(long_input_len=args.long_input_len, long_share=args.long_share)
                    prompts = _prompts(batch, input_len, vocab, seed=i, long_input_len=args.long_input_len,
                                       long_share=args.long_share)
                    point.update(_measure(engine, prompts, output_len))
                    report["points"].append(point)
                    progress.update()
                    tqdm.write(name + " " + json.dumps({k: point[k] for k in (
                        "batch", "input_len", "output_len", "forced_accept", "output_tok_per_s",
                        "mean_accept_length", "retractions")}))
            if profile_path is not None and profile_path.exists():
                # Per-cycle GPU times over the engine's points (the profiler syncs every cycle).
                report.setdefault("cycle_profile", {})[f"{name}@{forced}"] = json.loads(profile_path.read_text())
                for suffix in (".ops.txt", ".trace.json"):  # torch.profiler output of a few cycles
                    extra = Path(f"{profile_path}{suffix}")
                    if extra.exists():
                        shutil.copy(extra, Path(args.out).with_name(f"{Path(args.out).stem}.{name}{suffix}"))
            Path(args.out).write_text(json.dumps(report, indent=1))  # keep finished runs if a later one fails
    progress.close()
    add_speedups(report["points"])
    for p in report["points"]:
        if "speedup_vs_plain" in p and p["run"] != "plain":
            print(f"speedup vs plain: {p['run']} B={p['batch']} {p['input_len']}/{p['output_len']} "
                  f"accept={p['forced_accept']}: {p['speedup_vs_plain']:.2f}x", flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
