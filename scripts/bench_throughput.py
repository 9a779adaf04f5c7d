"""GPU throughput benchmark: plain decoding vs NGRAM vs SPARSESPEC, side by side, one process.

Random weights make acceptance meaningless, so speculative runs use a *forced acceptance*:
SGLang's own benchmark-only environment variable ``SGLANG_SIMULATE_ACC_LEN`` (read by
``eagle_sample``, which both NGRAM and SPARSESPEC verify through) fixes the accepted length
per cycle. It is not a server flag; this script sets it only for the speculative engines and
prints a warning line for every run that uses it.

    python scripts/bench_throughput.py --shape qwen3-8b --batch 32 --input-len 512 \
        --output-len 1024 --forced-accept 7 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch


def _run(name: str, model_dir: str, args: argparse.Namespace, prompts: list[list[int]],
         forced_accept: float | None, **kwargs) -> dict:
    import sglang as sgl

    if forced_accept is not None:
        os.environ["SGLANG_SIMULATE_ACC_LEN"] = str(forced_accept)
        print(f"WARNING [{name}]: benchmark-only forced acceptance SGLANG_SIMULATE_ACC_LEN="
              f"{forced_accept} (outputs are not the model's)", flush=True)
    else:
        os.environ.pop("SGLANG_SIMULATE_ACC_LEN", None)
    profile_path = None
    if args.profile and kwargs.get("speculative_algorithm") == "SPARSESPEC":
        profile_path = Path(tempfile.mkdtemp()) / "cycles.json"
        os.environ["SPARSESPEC_PROFILE"] = str(profile_path)
    else:
        os.environ.pop("SPARSESPEC_PROFILE", None)
    engine = sgl.Engine(model_path=model_dir, load_format="dummy", skip_tokenizer_init=True,
                        mem_fraction_static=args.mem_fraction, disable_prefill_cuda_graph=True,
                        max_running_requests=args.batch,
                        cuda_graph_max_bs_decode=args.cuda_graph_bs or args.batch,
                        log_level=args.log_level, **kwargs)
    sampling = {"temperature": 0.0, "max_new_tokens": args.output_len, "ignore_eos": True}
    try:
        engine.generate(input_ids=prompts[: min(4, len(prompts))],
                        sampling_params={**sampling, "max_new_tokens": 16})
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=sampling)
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
        os.environ.pop("SGLANG_SIMULATE_ACC_LEN", None)
        os.environ.pop("SPARSESPEC_PROFILE", None)
    metas = [o["meta_info"] for o in outs]
    tokens = sum(m["completion_tokens"] for m in metas)
    latencies = sorted(m.get("e2e_latency", elapsed) for m in metas)
    accept = [m["spec_accept_length"] for m in metas if "spec_accept_length" in m]
    result = {"output_tokens": tokens, "seconds": elapsed, "output_tok_per_s": tokens / elapsed,
              "latency_p50_s": latencies[len(latencies) // 2], "latency_max_s": latencies[-1],
              "mean_accept_length": sum(accept) / len(accept) if accept else None,
              "forced_accept": forced_accept, "engine_kwargs": kwargs}
    if profile_path is not None and profile_path.exists():
        # Per-cycle GPU times (the profiler syncs every cycle, so tok/s of this run is lower).
        result["cycle_profile"] = json.loads(profile_path.read_text())
        print(name, "cycle profile", json.dumps(result["cycle_profile"]), flush=True)
        for suffix in (".ops.txt", ".trace.json"):  # torch.profiler output of a few cycles
            extra = Path(f"{profile_path}{suffix}")
            if extra.exists():
                shutil.copy(extra, Path(args.out).with_name(f"{Path(args.out).stem}.{name}{suffix}"))
    print(name, json.dumps({k: result[k] for k in ("output_tok_per_s", "mean_accept_length")}),
          flush=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="qwen3-8b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--forced-accept", type=float, default=7.0,
                    help="accepted tokens per cycle incl. the bonus (7 = 6 of 8 drafts)")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--runs", default="plain,ngram,sparsespec",
                    help="comma list of: plain, ngram, sparsespec, sparsespec-draftnorm")
    ap.add_argument("--profile", action="store_true",
                    help="SPARSESPEC runs record per-cycle GPU phase times (SPARSESPEC_PROFILE; syncs)")
    ap.add_argument("--log-level", default="warning",
                    help="engine log level; 'info' adds SGLang's per-interval decode lines "
                         "(running requests, KV usage, tok/s) and the SPARSESPEC cycle means")
    ap.add_argument("--cuda-graph-bs", type=int, default=None,
                    help="largest CUDA-graph batch (default: --batch)")
    args = ap.parse_args()

    from sparsespec_sglang.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape,
                                   with_weights=False, dtype="bfloat16"))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(args.input_len)]
               for _ in range(args.batch)]
    runs = {
        "plain": dict(forced_accept=None, attention_backend="triton"),
        "ngram": dict(forced_accept=args.forced_accept, attention_backend="triton",
                      speculative_algorithm="NGRAM", speculative_num_draft_tokens=args.k + 1),
        "sparsespec": dict(forced_accept=args.forced_accept, speculative_algorithm="SPARSESPEC",
                           speculative_num_steps=args.k),
        "sparsespec-draftnorm": dict(forced_accept=args.forced_accept, speculative_algorithm="SPARSESPEC",
                                     speculative_num_steps=args.k, sparsespec_score_norm="draft"),
    }
    report = {"command": " ".join(sys.argv), "gpu": torch.cuda.get_device_name(),
              "torch": torch.__version__, "shape": args.shape, "batch": args.batch,
              "input_len": args.input_len, "output_len": args.output_len, "k": args.k, "runs": {}}
    for name in args.runs.split(","):
        report["runs"][name] = _run(name, model_dir, args, prompts, **runs[name])
    base = report["runs"].get("plain", {}).get("output_tok_per_s")
    if base:
        report["speedup_vs_plain"] = {n: r["output_tok_per_s"] / base for n, r in report["runs"].items()}
        print("speedup vs plain:", json.dumps(report["speedup_vs_plain"]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
