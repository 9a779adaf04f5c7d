"""GPU check: every output token of SPARSESPEC is plain SGLang's greedy choice (up to stated near-ties).

check_lossless.py compares two free-running decodes, so after the first bf16 tie the two
sequences part and nothing past it is checked. Here plain SGLang teacher-forces each SPARSESPEC
output instead: ONE prefill of prompt + output with ``return_logprob=True,
logprob_start_len=len(prompt) - 1, top_logprobs_num=2`` gives plain's top-2 at every output
position, conditioned on SPARSESPEC's own earlier tokens. A position passes if SPARSESPEC's token
is plain's top-1 (exact) or plain's top-2 with a top-1/top-2 logprob gap under ``--tie-threshold``
(a near-tie, counted apart). Every position of every request is checked: a wrong token after a
near-tie is still found, and no list of failures is cut short.

Order: the SPARSESPEC engine generates (greedy) -> shut down -> a plain engine teacher-forces
(with ``--deterministic`` it also decodes, and the SPARSESPEC ids must equal plain's exactly).

    python scripts/check_every_token.py --model-dir smollm2 --num-prompts 64 --max-new-tokens 2048 --out et.json
    python scripts/check_every_token.py --shape small --num-prompts 8 --max-new-tokens 256 --out et.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from sparsespec_sglang.testing import provenance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_lossless import _prefill_tokens, _stdio_to  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pure checking logic


@dataclass(frozen=True)
class PlainTop2:
    """Plain SGLang's view of one output position under teacher forcing."""

    token: int  # the teacher-forced token there (SPARSESPEC's output token)
    top1: int
    top1_logprob: float
    top2: int
    top2_logprob: float
    token_logprob: float | None = None  # plain's logprob of the teacher-forced token itself

    @property
    def gap(self) -> float:
        return self.top1_logprob - self.top2_logprob

    @property
    def token_gap(self) -> float | None:
        """top-1 minus the token's own logprob: catches ties of three or more, where the tied
        token SPARSESPEC picked is not among plain's top-2 only because of tie order."""
        return None if self.token_logprob is None else self.top1_logprob - self.token_logprob


def records_from_meta_info(meta_info: dict, num_output: int) -> list[PlainTop2]:
    """Per-output-position records from a teacher-forcing request's meta_info (the same layout in
    SGLang 0.5.17 to 0.5.23).

    With ``logprob_start_len = len(prompt) - 1`` over prompt + output (n tokens), SGLang returns
    n + 1 rows: row 0 is the last prompt token (logprob None, top None); row j >= 1 holds
    ``input_token_logprobs[j] = (logprob, token_id, text)`` of input token len(prompt) - 1 + j,
    i.e. output token j - 1, and ``input_top_logprobs[j]`` the top-k ``(logprob, token_id, text)``
    of the distribution that predicts it."""
    tokens = meta_info.get("input_token_logprobs")
    tops = meta_info.get("input_top_logprobs")
    if tokens is None or tops is None:
        raise ValueError("meta_info lacks input_token_logprobs / input_top_logprobs "
                         "(ask with return_logprob=True, top_logprobs_num=2, and not the flat format)")
    if len(tokens) != num_output + 1 or len(tops) != num_output + 1:
        raise ValueError(f"expected {num_output + 1} input logprob rows (last prompt token + {num_output} "
                         f"outputs), got {len(tokens)} token rows and {len(tops)} top rows")
    records = []
    for j in range(1, num_output + 1):
        top = tops[j]
        if top is None or len(top) < 2:
            raise ValueError(f"output position {j - 1}: plain returned no top-2 ({top!r})")
        (lp1, id1, *_), (lp2, id2, *_) = top[0], top[1]
        if lp2 > lp1:  # SGLang sorts by logprob; keep the check independent of that
            (lp1, id1), (lp2, id2) = (lp2, id2), (lp1, id1)
        token_lp = tokens[j][0]
        records.append(PlainTop2(int(tokens[j][1]), int(id1), float(lp1), int(id2), float(lp2),
                                 None if token_lp is None else float(token_lp)))
    return records


def check_positions(spec_tokens: Sequence[int], records: Sequence[PlainTop2], tie_threshold: float) -> dict:
    """Classify every position: exact (plain's top-1), near-tie (plain's top-2, gap < threshold),
    or failing (anything else). Never stops early; the failing list is complete."""
    if len(records) != len(spec_tokens):
        raise ValueError(f"{len(records)} plain records for {len(spec_tokens)} SPARSESPEC tokens")
    n_exact = 0
    near_ties: list[dict] = []
    failing: list[dict] = []
    for pos, (tok, rec) in enumerate(zip(spec_tokens, records)):
        if rec.token != tok:  # the teacher-forced input must be the SPARSESPEC output itself
            raise ValueError(f"position {pos}: teacher-forced token {rec.token} != SPARSESPEC token {tok}")
        if tok == rec.top1:
            n_exact += 1
            continue
        entry = {"pos": pos, "token": tok, "plain_top1": rec.top1, "plain_top2": rec.top2,
                 "gap": rec.gap, "token_gap": rec.token_gap}
        if tok == rec.top2 and rec.gap < tie_threshold:
            near_ties.append(entry)
        elif rec.token_gap is not None and rec.token_gap < tie_threshold:
            entry["kind"] = "tie beyond top-2"
            near_ties.append(entry)
        else:
            entry["reason"] = "top-2 over the tie threshold" if tok == rec.top2 else "not plain's top-2"
            failing.append(entry)
    return {"n_positions": len(records), "n_exact": n_exact, "n_near_tie": len(near_ties),
            "n_failing": len(failing), "failing": failing, "near_ties": near_ties}


def exact_equality(plain: Sequence[Sequence[int]], spec: Sequence[Sequence[int]]) -> dict:
    """Deterministic mode: SPARSESPEC ids must equal plain's; every mismatching request listed."""
    mismatches = []
    for i, (a, b) in enumerate(zip(plain, spec)):
        if list(a) != list(b):
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatches.append({"request": i, "first_mismatch": first, "len_plain": len(a), "len_spec": len(b)})
    return {"equal": not mismatches and len(plain) == len(spec), "num_mismatched": len(mismatches),
            "mismatches": mismatches}


def retraction_points(log: str) -> dict[str, list[int]]:
    """rid -> KV lengths at each retraction whose KV went to the hierarchical cache
    (patches/retraction.py logs them; plain retract-and-recompute logs no per-request point)."""
    points: dict[str, list[int]] = {}
    for rid, kv in re.findall(r"retracted request (\S+) keeps its (\d+) KV tokens", log):
        points.setdefault(rid, []).append(int(kv))
    return points


def retraction_summary(log: str) -> dict:
    """Scheduler-wide retraction events and requests, from SGLang's "#retracted_reqs: N" lines."""
    counts = [int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log)]
    return {"retraction_events": len(counts), "retracted_reqs_logged": sum(counts)}


def summarize(requests: Sequence[dict], tie_threshold: float) -> dict:
    total = {key: sum(r[key] for r in requests) for key in ("n_positions", "n_exact", "n_near_tie", "n_failing")}
    total["requests_failing"] = sum(1 for r in requests if r["n_failing"] or r.get("truncated"))
    total["requests_truncated"] = sum(1 for r in requests if r.get("truncated"))
    total["tie_threshold"] = tie_threshold
    return total


def summary_line(total: dict, retracted: int, deterministic: dict | None) -> str:
    ok = total["requests_failing"] == 0 and (deterministic is None or deterministic["equal"])
    line = (f"every-token {'PASS' if ok else 'FAIL'}: {total['n_positions']} positions, {total['n_exact']} exact, "
            f"{total['n_near_tie']} near-tie (gap < {total['tie_threshold']}), {total['n_failing']} failing, "
            f"{total['requests_failing']} failing requests ({total['requests_truncated']} truncated), "
            f"{retracted} retractions")
    if deterministic is not None:
        line += f", deterministic exact: {deterministic['equal']} ({deterministic['num_mismatched']} mismatched)"
    return line


# ----------------------------------------------------------------------------- prompts


def load_prompts(model_dir: str, num_prompts: int, path: Path | None = None) -> list[list[int]]:
    """The project's reasoning prompts (``sparsespec_sglang.testing.prompts``), each question as one
    user turn in the model's chat template, cycled to ``num_prompts``."""
    from transformers import AutoTokenizer

    from sparsespec_sglang.testing import prompts as project_prompts

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        records = project_prompts.load_prompts(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--prompts: {e}") from None
    texts = [project_prompts.chat_prompt(tokenizer, records[i % len(records)]["question"])
             for i in range(num_prompts)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def random_model_and_prompts(args: argparse.Namespace) -> tuple[str, list[list[int]]]:
    from sparsespec_sglang.testing.model_dirs import make_model_dir

    model_dir = str(make_model_dir(Path(tempfile.mkdtemp()) / args.shape, args.shape, with_weights=True,
                                   dtype=args.dtype))
    vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    rng = random.Random(0)
    return model_dir, [[rng.randrange(3, vocab) for _ in range(rng.randint(64, 512))]
                       for _ in range(args.num_prompts)]


# ----------------------------------------------------------------------------- engines


def _engine(model_dir: str, args: argparse.Namespace, log_level: str = "warning", radix_cache: bool = True,
            **kwargs):
    import sglang as sgl

    if args.deterministic:
        kwargs["enable_deterministic_inference"] = True
    return sgl.Engine(model_path=model_dir, dtype=args.dtype, skip_tokenizer_init=True,
                      mem_fraction_static=args.mem_fraction, disable_radix_cache=args.deterministic or not radix_cache,
                      cuda_graph_max_bs_decode=args.cuda_graph_max_bs, disable_prefill_cuda_graph=True,
                      log_level=log_level, max_running_requests=args.num_prompts, **kwargs)


async def _generate_all(engine, prompts: list[list[int]], sampling: list[dict], stagger_s: float,
                        bar: tqdm, **extra) -> list[dict]:
    """Request i arrives i * stagger_s after the first (joins a running batch); ragged lengths
    make them leave at different times. The bar counts finished requests."""

    async def one(i: int) -> dict:
        await asyncio.sleep(i * stagger_s)
        out = await engine.async_generate(input_ids=prompts[i], sampling_params=sampling[i], **extra)
        bar.update()
        return out

    return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def generate(engine, prompts, sampling, stagger_s: float, desc: str, quiet: bool) -> list[dict]:
    with tqdm(total=len(prompts), desc=desc, unit="req", disable=quiet) as bar:
        return engine.loop.run_until_complete(_generate_all(engine, prompts, sampling, stagger_s, bar))


def teacher_force(engine, prompts: list[list[int]], outputs: list[list[int]], batch: int,
                  quiet: bool) -> list[list[PlainTop2]]:
    """Plain's top-2 at every output position: one prefill of prompt + output per request."""
    records = []
    with tqdm(total=len(prompts), desc="plain teacher-forcing", unit="req", disable=quiet) as bar:
        for start in range(0, len(prompts), batch):
            ps, os_ = prompts[start:start + batch], outputs[start:start + batch]
            res = engine.generate(input_ids=[p + o for p, o in zip(ps, os_)],
                                  sampling_params={"temperature": 0.0, "max_new_tokens": 1},
                                  return_logprob=True, logprob_start_len=[len(p) - 1 for p in ps],
                                  top_logprobs_num=2)
            records += [records_from_meta_info(r["meta_info"], len(o)) for r, o in zip(res, os_)]
            bar.update(len(ps))
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a Hugging Face model dir (real weights; prompts from --prompts)")
    src.add_argument("--shape", help="random-weight model of this testing shape (random prompts)")
    ap.add_argument("--prompts", type=Path, default=None,
                    help="prompt jsonl (default: $SPARSESPEC_PROMPTS or benchmarks/prompts/reasoning_prompts.jsonl)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--ragged-max-new-tokens", action="store_true",
                    help="max_new_tokens drawn per request from [max/4, max]: requests leave mid-batch")
    ap.add_argument("--stop-at-eos", action="store_true", help="stop at EOS (default: ignore_eos, full length)")
    ap.add_argument("--stagger-s", type=float, default=0.0,
                    help="request i arrives i * STAGGER_S seconds after the first (joins a running batch)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.05)
    ap.add_argument("--min-selected", type=int, default=None, help="--sparsespec-min-selected (default: plugin's)")
    ap.add_argument("--schedule", default="unified", choices=("unified", "lockstep"), help="--sparsespec-schedule")
    ap.add_argument("--adaptive", default="off", choices=("on", "off"),
                    help="--sparsespec-adaptive: each request speculates or decodes densely, chosen per step")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="cap the SPARSESPEC engine's KV pool (tokens) so requests are retracted mid-output")
    ap.add_argument("--enable-hierarchical-cache", action="store_true",
                    help="SPARSESPEC engine: retracted requests' KV goes to the host pool (patches/retraction.py)")
    ap.add_argument("--deterministic", action="store_true",
                    help="--enable-deterministic-inference everywhere; SPARSESPEC ids must equal a plain decode's")
    ap.add_argument("--tie-threshold", type=float, default=0.25,
                    help="top-1/top-2 logprob gap under which plain's top-2 passes as a near-tie "
                         "(0.25 = 4 bf16 ulps for logits of magnitude 8..16)")
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=64)
    ap.add_argument("--teacher-batch", type=int, default=16, help="teacher-forcing requests per generate call")
    ap.add_argument("--log-out", type=Path, default=None, help="SPARSESPEC engine log (default: OUT with .log)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args()
    for flag, value, ok in (("--num-prompts", args.num_prompts, args.num_prompts >= 1),
                            ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--teacher-batch", args.teacher_batch, args.teacher_batch >= 1),
                            ("--tie-threshold", args.tie_threshold, args.tie_threshold >= 0)):
        if not ok:
            ap.error(f"{flag} must be >= {0 if flag == '--tie-threshold' else 1}, got {value}")

    import torch

    if not torch.cuda.is_available():
        ap.exit(2, "check_every_token.py: needs a CUDA GPU (torch.cuda.is_available() is False here)\n")
    if args.model_dir:
        model_dir, prompts = args.model_dir, load_prompts(args.model_dir, args.num_prompts, args.prompts)
    else:
        model_dir, prompts = random_model_and_prompts(args)
    rng = random.Random(1)
    sampling = [{"temperature": 0.0, "ignore_eos": not args.stop_at_eos,
                 "max_new_tokens": (rng.randint(max(1, args.max_new_tokens // 4), args.max_new_tokens)
                                    if args.ragged_max_new_tokens else args.max_new_tokens)}
                for _ in prompts]

    spec_kwargs: dict[str, Any] = dict(speculative_algorithm="SPARSESPEC", speculative_num_steps=args.k,
                                       sparsespec_sparsity=args.sparsity, sparsespec_schedule=args.schedule,
                                       sparsespec_adaptive=args.adaptive)
    if args.min_selected is not None:
        spec_kwargs["sparsespec_min_selected"] = args.min_selected
    if args.max_total_tokens:
        spec_kwargs["max_total_tokens"] = args.max_total_tokens
    if args.enable_hierarchical_cache:
        spec_kwargs["enable_hierarchical_cache"] = True
    log_path = args.log_out or Path(args.out).with_suffix(".log")
    with _stdio_to(log_path):  # info log: retraction lines and the KV-kept lines with their rids
        engine = _engine(model_dir, args, log_level="info", **spec_kwargs)
    try:
        spec = generate(engine, prompts, sampling, args.stagger_s, "SPARSESPEC generate", args.quiet)
    finally:
        engine.shutdown()
    log = log_path.read_text(errors="replace")

    # No prefix cache for plain: every teacher-forced position is computed by this request's own
    # prefill, whatever SGLang's rules for caching below logprob_start_len.
    engine = _engine(model_dir, args, radix_cache=False, attention_backend="triton")
    try:
        plain_ids = None
        if args.deterministic:
            plain = generate(engine, prompts, sampling, args.stagger_s, "plain generate", args.quiet)
            plain_ids = [o["output_ids"] for o in plain]
        spec_ids = [o["output_ids"] for o in spec]
        records = teacher_force(engine, prompts, spec_ids, args.teacher_batch, args.quiet)
    finally:
        engine.shutdown()

    kept = retraction_points(log)
    requests = []
    for i, (out, recs) in enumerate(tqdm(list(zip(spec, records)), desc="checking", disable=args.quiet)):
        meta = out["meta_info"]
        res = check_positions(out["output_ids"], recs, args.tie_threshold)
        offsets = [kv - len(prompts[i]) for kv in kept.get(meta.get("id"), [])]
        n_out = len(out["output_ids"])
        finish = meta.get("finish_reason") or {}
        truncated = n_out < sampling[i]["max_new_tokens"] and finish.get("type") != "stop"
        requests.append({
            "request": i, "rid": meta.get("id"), "prompt_len": len(prompts[i]), "output_len": n_out,
            "max_new_tokens": sampling[i]["max_new_tokens"], "finish_reason": finish, "truncated": truncated,
            "num_retractions": meta.get("num_retractions", 0),
            # Output offsets at which this request's KV went to the host cache (HiCache runs only).
            "retraction_output_offsets": offsets,
            "positions_checked_past_first_retraction": max(0, n_out - min(offsets)) if offsets else None,
            "spec_verify_ct": meta.get("spec_verify_ct"), "spec_num_correct_drafts": meta.get("spec_num_correct_drafts"),
            **res,
        })
    total = summarize(requests, args.tie_threshold)
    retracted = sum(r["num_retractions"] for r in requests)
    deterministic = exact_equality(plain_ids, [o["output_ids"] for o in spec]) if plain_ids is not None else None
    report = {
        "command": " ".join(sys.argv), "versions": provenance.versions(), "machine": platform.node(),
        "model": args.model_dir or f"random {args.shape}", "dtype": args.dtype, "schedule": args.schedule,
        "adaptive": args.adaptive,
        "k": args.k, "sparsity": args.sparsity, "min_selected": args.min_selected,
        "num_prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
        "ragged": args.ragged_max_new_tokens, "stagger_s": args.stagger_s, "ignore_eos": not args.stop_at_eos,
        "max_total_tokens": args.max_total_tokens, "hierarchical_cache": args.enable_hierarchical_cache,
        "deterministic": args.deterministic, "summary": total,
        "retractions": {"total": retracted, "requests_retracted": sum(1 for r in requests if r["num_retractions"]),
                        # every position is checked, so a retracted request's tail is too; counted here
                        "positions_checked_in_retracted_requests": sum(
                            r["n_positions"] for r in requests if r["num_retractions"]),
                        "positions_checked_past_known_retraction_points": sum(
                            r["positions_checked_past_first_retraction"] or 0 for r in requests),
                        **retraction_summary(log), **_prefill_tokens(log)},
        "deterministic_exact": deterministic, "log": str(log_path), "requests": requests,
    }
    Path(args.out).write_text(json.dumps(report, indent=1))
    line = summary_line(total, retracted, deterministic)
    print(line, flush=True)
    return 0 if line.startswith("every-token PASS") else 1


if __name__ == "__main__":
    sys.exit(main())
