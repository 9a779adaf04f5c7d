"""GPU check: SPARSESPEC greedy output token ids equal plain SGLang decoding, every token.

Builds a small Qwen3-shaped model with real (random, peaky) weights, runs the
same prompts through a plain ``sglang.Engine`` (Triton backend) and through
SPARSESPEC engines (overlap scheduler on and off), and writes per-run token-id
equality, the first mismatch, throughput and SGLang's spec metrics as JSON.

The verdict is ``EQUAL`` only when every output token of every request equals plain's
(the lossless verdict; with ``--deterministic`` it is the one expected). Two free-running
decodes that part at a near-tie (bf16 rounding) cannot be compared after it: such a run's
verdict is ``DIVERGED-AT-NEAR-TIES``, which says nothing about the tokens after each first
divergence (``positions_compared`` counts what was compared). For an every-token verdict
in bf16 without deterministic inference, use ``check_every_token.py`` (teacher-forced).

    python scripts/check_lossless.py --out lossless.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import torch


def _engine(model_dir: str, args: argparse.Namespace, log_level: str = "warning", **kwargs):
    import sglang as sgl

    if args.max_total_tokens:
        kwargs["max_total_tokens"] = args.max_total_tokens
    if args.deterministic:
        kwargs["enable_deterministic_inference"] = True
    # Deterministic runs compare bitwise: no engine may reuse the warm-up's cached prefixes
    # (SGLang turns the radix cache off for SPARSESPEC there, so plain must match).
    return sgl.Engine(model_path=model_dir, dtype=args.dtype, skip_tokenizer_init=True,
                      mem_fraction_static=args.mem_fraction, disable_radix_cache=args.deterministic,
                      cuda_graph_max_bs_decode=args.cuda_graph_max_bs,
                      disable_decode_cuda_graph=args.disable_cuda_graph,
                      disable_prefill_cuda_graph=True, log_level=log_level,
                      max_running_requests=args.num_prompts, tp_size=args.tp, **kwargs)


async def _staggered(engine, prompts: list[list[int]], sampling: list[dict], extras: list[dict],
                     stagger_s: float) -> list[dict]:
    """Request i arrives i * stagger_s after the first, so requests join a running batch."""

    async def one(i: int) -> dict:
        await asyncio.sleep(i * stagger_s)
        return await engine.async_generate(input_ids=prompts[i], sampling_params=sampling[i], **extras[i])

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


@contextlib.contextmanager
def _stdio_to(path: Path):
    """Point fds 1 and 2 at ``path`` while the engine's processes start (they inherit them)."""
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _prefill_tokens(log: str) -> dict:
    """Prefill tokens computed and served from the prefix cache, summed over the scheduler's
    "Prefill batch" log lines. Unlike meta_info's cached_tokens, which SGLang counts only at a
    request's first admission, this includes the re-admission of retracted requests."""
    rows = re.findall(r"Prefill batch.*?#new-token: (\d+), #cached-token: (\d+)", log)
    return {"prefill_computed_tokens": sum(int(n) for n, _ in rows),
            "prefill_cached_tokens": sum(int(c) for _, c in rows)}


def _run(model_dir: str, args: argparse.Namespace, prompts: list[list[int]], sampling: list[dict],
         top_logprobs: bool = False, logprob_every: int = 0, **kwargs) -> dict:
    """One engine over all prompts; ``logprob_every = n``: requests n - 1, 2n - 1, ... ask for
    logprobs (their batches take SPARSESPEC's lockstep path, the others the default schedule)."""
    log_path = None
    if args.max_total_tokens:  # retraction runs: keep the scheduler's prefill log
        log_path = Path(tempfile.mkdtemp()) / "engine.log"
        with _stdio_to(log_path):
            engine = _engine(model_dir, args, log_level="info", **kwargs)
    else:
        engine = _engine(model_dir, args, **kwargs)
    extra = {"return_logprob": True, "top_logprobs_num": 2} if top_logprobs else {}
    asks = [not top_logprobs and logprob_every > 0 and i % logprob_every == logprob_every - 1
            for i in range(len(prompts))]
    extras = [{"return_logprob": True} if ask else extra for ask in asks]
    try:
        engine.generate(input_ids=prompts[:2], sampling_params={**sampling[0], "max_new_tokens": 8})
        start = time.perf_counter()
        if args.stagger_s > 0:
            outs = engine.loop.run_until_complete(_staggered(engine, prompts, sampling, extras, args.stagger_s))
        elif any(asks):
            outs = engine.generate(input_ids=prompts, sampling_params=sampling, return_logprob=asks)
        else:
            outs = engine.generate(input_ids=prompts, sampling_params=sampling, **extra)
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    ids = [o["output_ids"] for o in outs]
    metas = [o["meta_info"] for o in outs]
    prefill = _prefill_tokens(log_path.read_text()) if log_path else {}
    accept = [m["spec_accept_length"] for m in metas if "spec_accept_length" in m]
    gaps = None
    if top_logprobs:  # top-1 minus top-2 logprob at every output position
        gaps = [[t[0][0] - t[1][0] for t in m["output_top_logprobs"]] for m in metas]
    return {
        "output_ids": ids,
        "top2_gaps": gaps,
        "seconds": elapsed,
        "output_tok_per_s": sum(map(len, ids)) / elapsed,
        "mean_spec_accept_length": sum(accept) / len(accept) if accept else None,
        # Prompt tokens served from the prefix cache at first admission (SGLang's meta_info).
        "cached_tokens": sum(m.get("cached_tokens", 0) for m in metas),
        "retractions": sum(m.get("num_retractions", 0) for m in metas),
        **prefill,
        "meta_info_example": {k: v for k, v in metas[0].items() if k.startswith("spec_")},
    }


def _compare(ref: list[list[int]], got: list[list[int]], gaps: list[list[float]] | None,
             tie_eps: float) -> dict:
    """Exact equality; a divergence is also classified by the plain run's top-2 logprob gap
    there: a near-tie (gap < tie_eps) is bf16 rounding, a clear winner is a bug."""
    mismatches = []
    compared = 0
    for i, (a, b) in enumerate(zip(ref, got)):
        first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        compared += len(a) if a == b else min(first + 1, len(a))  # up to the first divergence
        if a != b:
            gap = gaps[i][first] if gaps and first < len(gaps[i]) else None
            mismatches.append({"prompt": i, "first_mismatch": first, "len_ref": len(a),
                               "len_got": len(b), "ref_top2_gap": gap})
    clear = [m for m in mismatches if m["ref_top2_gap"] is None or m["ref_top2_gap"] >= tie_eps]
    return {"equal": not mismatches and len(ref) == len(got), "num_mismatched": len(mismatches),
            "num_clear_mismatches": len(clear), "positions_compared": compared,
            "positions_total": sum(len(a) for a in ref), "mismatches": mismatches[:8]}


def verdict(runs: list[dict]) -> str:
    """``EQUAL``: every token of every run equals plain's. ``DIVERGED-AT-NEAR-TIES``: some run
    parted from plain, each time at a near-tie, and the tokens after it were not compared (not a
    lossless verdict). ``MISMATCH``: a run parted from plain where plain had a clear winner."""
    if all(r["equal"] for r in runs):
        return "EQUAL"
    if all(r["num_clear_mismatches"] == 0 for r in runs):
        return "DIVERGED-AT-NEAR-TIES"
    return "MISMATCH"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="small")
    ap.add_argument("--dtype", default="bfloat16",
                    help="model dtype (default bfloat16: on CUDA, sgl_kernel's rmsnorm has no float32 path)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 512))
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-selected", type=int, default=16)
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=32)
    ap.add_argument("--disable-cuda-graph", action="store_true", help="decode/verify graphs off")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (GPUs)")
    ap.add_argument("--modes", default="overlap,no-overlap")
    ap.add_argument("--ragged-max-new-tokens", action="store_true",
                    help="max_new_tokens drawn per request from [max/4, max]: requests finish mid-cycle")
    ap.add_argument("--stagger-s", type=float, default=0.0,
                    help="request i arrives i * STAGGER_S seconds after the first (joins a running batch)")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="cap SGLang's KV pool (tokens) so that decoding runs out and retracts requests")
    ap.add_argument("--hierarchical-cache", action="store_true",
                    help="--enable-hierarchical-cache for the SPARSESPEC engines: with --max-total-tokens, "
                         "retracted requests' KV goes to the host pool and is loaded back on re-admission "
                         "(patches/retraction.py) instead of being recomputed")
    ap.add_argument("--deterministic", action="store_true",
                    help="--enable-deterministic-inference for every engine: SGLang's batch-invariant "
                         "decoding, and SPARSESPEC verifies each token with the same decode kernel, so "
                         "the outputs must be equal, not just equal up to ties")
    ap.add_argument("--score-norm", default=None, choices=("exact", "draft"),
                    help="--sparsespec-score-norm of the SPARSESPEC runs (default: the plugin's)")
    ap.add_argument("--schedule", default=None, choices=("lockstep", "unified"),
                    help="--sparsespec-schedule of the SPARSESPEC runs (default: the plugin's)")
    ap.add_argument("--adaptive", default=None, choices=("on", "off"),
                    help="--sparsespec-adaptive of the SPARSESPEC runs (default: the plugin's)")
    ap.add_argument("--dense-backend", default=None, choices=("triton", "flashinfer"),
                    help="--sparsespec-dense-backend of the SPARSESPEC runs (default: the plugin's)")
    ap.add_argument("--spec-logprob-every", type=int, default=0,
                    help="SPARSESPEC runs: requests N-1, 2N-1, ... ask for logprobs, so batches switch "
                         "between the unified schedule and the lockstep path such requests take")
    ap.add_argument("--tie-eps", type=float, default=0.25,
                    help="plain top-2 logprob gap below which a divergence counts as a rounding tie "
                         "(0.25 = 4 bf16 ulps for logits of magnitude 8..16)")
    ap.add_argument("--dense-check", action="store_true",
                    help="also run SPARSESPEC with sparsity 1.0 (drafts see every token)")
    args = ap.parse_args()

    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape,
                                   with_weights=True, dtype=args.dtype))
    rng = random.Random(0)
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))]
               for _ in range(args.num_prompts)]
    sampling = [{"temperature": 0.0, "ignore_eos": True,
                 "max_new_tokens": (rng.randint(max(1, args.max_new_tokens // 4), args.max_new_tokens)
                                    if args.ragged_max_new_tokens else args.max_new_tokens)}
                for _ in prompts]

    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype,
              "deterministic": args.deterministic,
              "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "tp": args.tp,
              "runs": {}}
    base = _run(model_dir, args, prompts, sampling, top_logprobs=True, attention_backend="triton")
    report["runs"]["plain"] = {k: v for k, v in base.items() if k not in ("output_ids", "top2_gaps")}
    all_gaps = sorted(g for row in base["top2_gaps"] for g in row)
    report["plain_top2_gap_quantiles"] = {q: all_gaps[int(q * (len(all_gaps) - 1))]
                                          for q in (0.0, 0.01, 0.05, 0.5)}
    spec_kwargs = dict(speculative_algorithm="SPARSESPEC", speculative_num_steps=args.k,
                       sparsespec_sparsity=args.sparsity, sparsespec_min_selected=args.min_selected)
    if args.score_norm:
        spec_kwargs["sparsespec_score_norm"] = args.score_norm
    if args.schedule:
        spec_kwargs["sparsespec_schedule"] = args.schedule
    if args.adaptive:
        spec_kwargs["sparsespec_adaptive"] = args.adaptive
    if args.dense_backend:
        spec_kwargs["sparsespec_dense_backend"] = args.dense_backend
    if args.hierarchical_cache:
        spec_kwargs["enable_hierarchical_cache"] = True
    modes = [(m, args.sparsity) for m in args.modes.split(",")]
    if args.dense_check:
        modes.append(("no-overlap", 1.0))
    spec_ids = {}
    for mode, sparsity in modes:
        name = f"sparsespec-{mode}-s{sparsity}"
        run = _run(model_dir, args, prompts, sampling, disable_overlap_schedule=mode == "no-overlap",
                   logprob_every=args.spec_logprob_every, **{**spec_kwargs, "sparsespec_sparsity": sparsity})
        spec_ids[name] = run["output_ids"]
        entry = {k: v for k, v in run.items() if k not in ("output_ids", "top2_gaps")}
        entry.update(_compare(base["output_ids"], run["output_ids"], base["top2_gaps"], args.tie_eps))
        report["runs"][name] = entry
        print(name, json.dumps({k: entry[k] for k in ("equal", "num_mismatched", "num_clear_mismatches",
                                                       "mean_spec_accept_length", "retractions")}), flush=True)
    # Reported, not required: after a bf16 tie, runs whose verify windows sit at different
    # offsets may break the tie differently.
    names = list(spec_ids)
    report["spec_runs_identical"] = all(spec_ids[n] == spec_ids[names[0]] for n in names[1:])
    print("spec runs identical to each other:", report["spec_runs_identical"], flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    spec_runs = [r for name, r in report["runs"].items() if name != "plain"]
    report["verdict"] = result = verdict(spec_runs)
    Path(args.out).write_text(json.dumps(report, indent=1))
    compared = sum(r["positions_compared"] for r in spec_runs)
    total = sum(r["positions_total"] for r in spec_runs)
    print(f"{result} ({compared} of {total} output positions compared)", flush=True)
    return 0 if result != "MISMATCH" else 1


if __name__ == "__main__":
    sys.exit(main())
