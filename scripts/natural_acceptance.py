"""Natural acceptance on real weights: SGLang's SPARSESPEC worker vs the PyTorch reference.

Forced-acceptance benchmarks fix how many drafts are accepted; this measures how many a real model
accepts on its own (greedy, no forcing) through ``sglang.Engine(speculative_algorithm="SPARSESPEC")``
on the default (unified) schedule, then runs the reference oracle
(``sparsespec_sglang.testing.reference.sparsespec_generate``, fp32 by default) two ways:

* aligned (the verdict): along each request's SGLang output tokens (``follow_tokens``), so both
  sides draft on the same committed text and the reference reproduces SGLang's cycle boundaries
  wherever its drafts agree with SGLang's. Pooled mean accepted drafts per cycle must agree within
  ``--tolerance``; a gap means the worker's selection, KV bookkeeping or accounting drifted (or
  bf16 vs fp32 drafting numerics: ``--ref-dtype bfloat16`` narrows that).
* free-running (reported, not judged): the reference decodes its own greedy text. bf16 and fp32
  greedy diverge after a few dozen tokens, so these means compare different texts.

    python scripts/natural_acceptance.py --model-dir smollm2 --min-selected 64 --ref-device cuda --out acc.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from sparsespec_sglang.testing import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_every_token import load_prompts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Where the two sides could count or select differently (read from pillar.py, unified.py,
# SGLang's batch_result_processor.py and testing/reference.py); reported with every result.
CONVENTIONS = {
    "first_cycle_selection": "same: the K most recent prompt tokens [L-K, L), K = min(clamp(ceil(s*L), "
                             "min_selected, max_selected), L - num_sink) (pillar.init_window / reference.window_selection)",
    "later_selection": "same: top-K of the verify scores over candidates [num_sink, P), "
                       "K from the context P + k + 1 (attention.py select_topk / reference select_topk)",
    "table_width": "SGLang also clamps K at its selection table width (PillarState.max_sel); "
                   "the reference has no such cap",
    "score_norm": "both 'exact' unless --score-norm says otherwise",
    "numerics": "SGLang: --dtype (default bfloat16: sgl_kernel's rmsnorm has no float32 path) with Triton kernels; reference: float32 eager PyTorch; "
                "score ties go to the lower position on both sides",
    "short_chains": "SGLang may draft fewer than k tokens near max_new_tokens (unified.py caps accept_lens at "
                    "the chain length); the reference always drafts k",
    "final_cycle": "SGLang's batch_result_processor skips the verify counters of a request that is already "
                   "finished when its last result is processed; the reference counts every cycle. Both "
                   "reference means are reported: all cycles, and without the last one",
    "first_token": "neither side counts the prefill's token as a cycle",
    "aligned": "the aligned reference commits SGLang's output tokens (follow_tokens) and stops at their end, "
               "so its last cycle counts only drafts that output covers; SGLang reports per request only "
               "totals and a histogram of accepted drafts per cycle (no per-cycle order), so per request the "
               "cycles, accepted totals and histograms are compared",
}


# ----------------------------------------------------------------------------- arithmetic


def sglang_request_stats(meta_info: dict) -> dict:
    """Cycles and accepted drafts of one request from SGLang's meta_info spec fields (absent when
    the request never verified, e.g. it finished at prefill). These names are the ones 0.5.17 to
    0.5.23 all write; 0.5.21 dropped their aliases (spec_accepted_drafts, spec_accept_histogram)."""
    cycles = int(meta_info.get("spec_verify_ct", 0) or 0)
    accepted = int(meta_info.get("spec_num_correct_drafts", 0) or 0)
    return {"cycles": cycles, "accepted": accepted, "completion_tokens": meta_info.get("completion_tokens"),
            "mean_accepted": accepted / cycles if cycles else None,
            "spec_accept_length": meta_info.get("spec_accept_length"),
            "histogram": list(meta_info.get("spec_correct_drafts_histogram") or [])}


def reference_request_stats(accepted_per_cycle: Sequence[int]) -> dict:
    """Reference cycles: all of them, and without the last (SGLang's final-cycle convention)."""
    n = len(accepted_per_cycle)
    total = sum(accepted_per_cycle)
    head = total - (accepted_per_cycle[-1] if n else 0)
    return {"cycles": n, "accepted": total, "mean_accepted": total / n if n else None,
            "cycles_without_last": max(n - 1, 0), "accepted_without_last": head,
            "mean_accepted_without_last": head / (n - 1) if n > 1 else None}


def accepted_histogram(accepted_per_cycle: Sequence[int]) -> list[int]:
    """Cycles per accepted-draft count (index = count), SGLang's spec_correct_drafts_histogram form."""
    hist = [0] * (max(accepted_per_cycle) + 1 if accepted_per_cycle else 0)
    for m in accepted_per_cycle:
        hist[m] += 1
    return hist


def aligned_request_stats(sglang: dict, accepted_per_cycle: Sequence[int]) -> dict:
    """One request: SGLang's totals vs the reference run along SGLang's own output tokens."""
    ref = reference_request_stats(accepted_per_cycle)
    ref["histogram"] = accepted_histogram(accepted_per_cycle)
    return {"reference": ref, "same_cycles": sglang["cycles"] == ref["cycles"],
            "same_accepted": sglang["accepted"] == ref["accepted"],
            "same_histogram": sglang["histogram"] == ref["histogram"],
            "difference": (None if sglang["mean_accepted"] is None or ref["mean_accepted"] is None
                           else sglang["mean_accepted"] - ref["mean_accepted"])}


def compare_aligned(sglang_rows: Sequence[dict], aligned_rows: Sequence[dict], tolerance: float) -> dict:
    """The verdict: pooled SGLang accepted/cycle vs the reference's along the same tokens."""
    refs = [a["reference"] for a in aligned_rows]
    sg, ref = pooled_mean(sglang_rows), pooled_mean(refs)
    diff = None if sg is None or ref is None else sg - ref
    return {"sglang_mean_accepted": sg, "reference_mean_accepted": ref,
            "reference_mean_accepted_without_last_cycle": pooled_mean(refs, "accepted_without_last",
                                                                      "cycles_without_last"),
            "sglang_cycles": sum(r["cycles"] for r in sglang_rows), "reference_cycles": sum(r["cycles"] for r in refs),
            "requests_same_cycles": sum(a["same_cycles"] for a in aligned_rows),
            "requests_same_accepted": sum(a["same_accepted"] for a in aligned_rows),
            "requests_same_histogram": sum(a["same_histogram"] for a in aligned_rows),
            "difference": diff, "tolerance": tolerance,
            "within_tolerance": diff is not None and abs(diff) <= tolerance}


def pooled_mean(rows: Sequence[dict], accepted_key: str = "accepted", cycles_key: str = "cycles") -> float | None:
    """Accepted drafts per cycle over all requests (each cycle weighs the same)."""
    cycles = sum(r[cycles_key] for r in rows)
    return sum(r[accepted_key] for r in rows) / cycles if cycles else None


def mean_of_means(rows: Sequence[dict], key: str = "mean_accepted") -> float | None:
    """Unweighted mean of the per-request means (each request weighs the same)."""
    vals = [r[key] for r in rows if r[key] is not None]
    return sum(vals) / len(vals) if vals else None


def engine_mean_accepted(server_info: dict) -> float | None:
    """SGLang's engine-wide counter: avg_spec_accept_length counts the bonus token, so minus one."""
    states = server_info.get("internal_states") or []
    if isinstance(states, dict):
        states = [states]
    vals = [s["avg_spec_accept_length"] for s in states if s.get("avg_spec_accept_length") is not None]
    return sum(vals) / len(vals) - 1.0 if vals else None


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing token (or the shorter length), None if equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare(sglang_rows: Sequence[dict], ref_rows: Sequence[dict], tolerance: float) -> dict:
    sg = pooled_mean(sglang_rows)
    ref_all = pooled_mean(ref_rows)
    ref_head = pooled_mean(ref_rows, "accepted_without_last", "cycles_without_last")
    diff = None if sg is None or ref_all is None else sg - ref_all
    diff_head = None if sg is None or ref_head is None else sg - ref_head
    return {"sglang_mean_accepted": sg, "reference_mean_accepted": ref_all,
            "reference_mean_accepted_without_last_cycle": ref_head,
            "sglang_mean_of_request_means": mean_of_means(sglang_rows),
            "reference_mean_of_request_means": mean_of_means(ref_rows),
            "difference": diff, "difference_vs_without_last_cycle": diff_head, "tolerance": tolerance,
            "within_tolerance": diff is not None and abs(diff) <= tolerance}


# ----------------------------------------------------------------------------- runs


def run_sglang(model_dir: str, prompts: list[list[int]], args: argparse.Namespace) -> tuple[list[dict], dict]:
    import sglang as sgl

    kwargs: dict[str, Any] = dict(speculative_algorithm="SPARSESPEC", speculative_num_steps=args.k,
                                  sparsespec_sparsity=args.sparsity, sparsespec_min_selected=args.min_selected)
    if args.score_norm:
        kwargs["sparsespec_score_norm"] = args.score_norm
    if args.selection:
        kwargs["sparsespec_selection"] = args.selection
    engine = sgl.Engine(model_path=model_dir, dtype=args.dtype, skip_tokenizer_init=True,
                        mem_fraction_static=args.mem_fraction, disable_prefill_cuda_graph=True,
                        log_level="warning", max_running_requests=len(prompts), **kwargs)
    try:
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0.0, "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos})
        seconds = time.perf_counter() - start
        info = engine.get_server_info()
    finally:
        engine.shutdown()
    return outs, {"seconds": seconds, "engine_mean_accepted": engine_mean_accepted(info),
                  "sparsespec_config": {k: v for k, v in info.items() if k.startswith("sparsespec")}}


def run_reference(model_dir: str, prompts: list[list[int]], args: argparse.Namespace,
                  follow: Sequence[Sequence[int]] | None = None) -> tuple[list[Any], list[Any] | None]:
    """Reference outputs per prompt: free-running, and (given `follow`, SGLang's output tokens per
    prompt) along those tokens. The SGLang tokens are also the free run's drafting guess: the
    same result in fewer forwards (see reference._greedy_drafts)."""
    from sparsespec_sglang.testing.reference import load_model, prefill, sparsespec_generate

    model = load_model(model_dir, device=args.ref_device, dtype=args.ref_dtype)
    kw = dict(num_draft_steps=args.k, sparsity=args.sparsity, min_selected=args.min_selected,
              score_norm=args.score_norm, selection=args.selection, ignore_eos=args.ignore_eos)
    free, aligned = [], [] if follow is not None else None
    for i, ids in enumerate(tqdm(prompts, desc="reference", unit="req", disable=args.quiet)):
        pre = prefill(model, ids)
        guess = follow[i] if follow is not None else None
        free.append(sparsespec_generate(model, ids, args.max_new_tokens, prefilled=pre, target_tokens=guess, **kw))
        if follow is not None:
            aligned.append(sparsespec_generate(model, ids, args.max_new_tokens, prefilled=pre,
                                               follow_tokens=follow[i], **kw))
    return free, aligned


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", required=True, help="Hugging Face model dir (real weights, chat template)")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="prompt jsonl (default: $SPARSESPEC_PROMPTS or benchmarks/prompts/reasoning_prompts.jsonl)")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--ignore-eos", action="store_true", help="both sides run the full budget past EOS")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-selected", type=int, required=True, help="--sparsespec-min-selected (both sides)")
    ap.add_argument("--score-norm", default=None, choices=("exact", "draft"), help="default: the plugin's")
    ap.add_argument("--selection", default=None,
                    help="--sparsespec-selection on both sides: pillar, window or hybrid:F (default: the plugin's)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                    help="SGLang side (the reference is always float32)")
    ap.add_argument("--ref-device", default="cuda", help="reference device: cuda or cpu")
    ap.add_argument("--ref-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="reference dtype (bfloat16 narrows the drafting-numerics gap to a bf16 SGLang run)")
    ap.add_argument("--tolerance", type=float, default=0.1,
                    help="largest |SGLang - aligned reference| pooled mean accepted drafts per cycle that "
                         "passes (the free-running difference is reported against it too, not judged)")
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args()
    if args.num_prompts < 1 or args.max_new_tokens < 1:
        ap.error("--num-prompts and --max-new-tokens must be >= 1")
    if args.min_selected < 0:
        ap.error(f"--min-selected must be an integer >= 0, got {args.min_selected}")
    if args.ref_device not in ("cuda", "cpu"):
        ap.error(f"--ref-device must be one of: cuda, cpu (got {args.ref_device})")

    prompts = load_prompts(args.model_dir, args.num_prompts, args.prompts)
    sg_outs, sg_info = run_sglang(args.model_dir, prompts, args)
    ref_outs, aligned_outs = run_reference(args.model_dir, prompts, args, [o["output_ids"] for o in sg_outs])

    sg_rows = [sglang_request_stats(o["meta_info"]) for o in sg_outs]
    ref_rows = [reference_request_stats(o.accepted_counts) for o in ref_outs]
    aligned_rows = [aligned_request_stats(s, a.accepted_counts) for s, a in zip(sg_rows, aligned_outs)]
    requests = [{"request": i, "prompt_len": len(p), "sglang": s, "reference": r, "aligned": al,
                 "aligned_cycles": [[c.output_offset, c.accepted] for c in ao.cycles],
                 "aligned_tokens_equal_sglang": ao.tokens == list(o["output_ids"]),
                 "sglang_output_len": len(o["output_ids"]), "reference_output_len": len(ro.tokens),
                 "first_token_mismatch": first_mismatch(o["output_ids"], ro.tokens)}
                for i, (p, s, r, al, o, ro, ao) in enumerate(zip(prompts, sg_rows, ref_rows, aligned_rows,
                                                                 sg_outs, ref_outs, aligned_outs))]
    result = compare(sg_rows, ref_rows, args.tolerance)
    aligned = compare_aligned(sg_rows, aligned_rows, args.tolerance)
    report = {"command": " ".join(sys.argv), "versions": provenance.versions(), "machine": platform.node(),
              "model_dir": args.model_dir, "num_prompts": args.num_prompts,
              "max_new_tokens": args.max_new_tokens, "ignore_eos": args.ignore_eos, "k": args.k,
              "sparsity": args.sparsity, "min_selected": args.min_selected, "score_norm": args.score_norm,
              "selection": args.selection, "sglang_dtype": args.dtype, "reference_dtype": args.ref_dtype, "reference_device": args.ref_device,
              "schedule": "plugin default (unified)", **result, "aligned": aligned,
              "verdict": "aligned: |SGLang - reference along SGLang's tokens| pooled mean accepted/cycle "
                         f"<= {args.tolerance}: {'pass' if aligned['within_tolerance'] else 'FAIL'}",
              "sglang_engine": sg_info,
              "requests_identical_tokens": sum(r["first_token_mismatch"] is None for r in requests),
              "conventions": CONVENTIONS, "requests": requests}
    Path(args.out).write_text(json.dumps(report, indent=1))
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    n = len(requests)
    print(f"natural acceptance (min_selected {args.min_selected}): aligned on SGLang's tokens: SGLang "
          f"{fmt(aligned['sglang_mean_accepted'])} vs reference ({args.ref_dtype}) "
          f"{fmt(aligned['reference_mean_accepted'])} accepted/cycle, difference {fmt(aligned['difference'])} "
          f"{'within' if aligned['within_tolerance'] else 'OUTSIDE'} tolerance {args.tolerance}; same cycles "
          f"{aligned['requests_same_cycles']}/{n}, same accepted {aligned['requests_same_accepted']}/{n}, "
          f"same histogram {aligned['requests_same_histogram']}/{n}; free-running reference "
          f"{fmt(result['reference_mean_accepted'])} (without last cycle "
          f"{fmt(result['reference_mean_accepted_without_last_cycle'])}), engine counter "
          f"{fmt(sg_info['engine_mean_accepted'])}, {report['requests_identical_tokens']}/{n} requests "
          f"token-identical", flush=True)
    return 0 if aligned["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
