"""Per-pass token counts of unified batching (``PhasePlanner``) vs lockstep, simulated on the CPU.

Continuous batching of ``--num-requests`` requests through ``--batch`` slots: each request has a
random output length, every verify accepts a random number of its drafts (each draft accepted
with probability ``--accept-prob`` until the first rejection, plus the bonus token), a finished
request frees its slot and the next queued request is admitted (its prefill is not a decode
pass and is not counted); finishes leave and newcomers join at step boundaries (every k + 1
passes), as in SGLang's scheduler. Reports, over the passes where the batch is full (after the first cycle) and over all passes,
the max/min ratio of tokens per pass, the planner's host time per pass, and how many cycles it
shortened to rebalance; lockstep (every request drafts k passes, then all verify) beside it.

    python scripts/sim_phases.py --out sim_phases.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from sparsespec_sglang.phases import PhasePlanner


def _accepted(rng: random.Random, drafts: int, p: float) -> int:
    n = 0
    while n < drafts and rng.random() < p:
        n += 1
    return n + 1  # + the bonus (or correction) token


def _stats(tokens: list[int], full: list[bool], warmup: int) -> dict:
    """Ratios over every pass and over the full-batch passes after the first ``warmup`` (the
    first cycle after admitting a whole batch at once cannot be flat: nobody has drafted yet)."""
    steady = [t for t, f in zip(tokens[warmup:], full[warmup:]) if f]
    out = {"passes": len(tokens), "max_min_ratio_all": max(tokens) / max(1, min(tokens))}
    if steady:
        out.update(full_batch_passes=len(steady), max_min_ratio_full_batch=max(steady) / min(steady),
                   mean_tokens_full_batch=sum(steady) / len(steady))
    return out


def simulate_unified(args: argparse.Namespace, lengths: list[int]) -> dict:
    rng = random.Random(args.seed)
    planner, queue, left = PhasePlanner(args.k), list(range(len(lengths))), {}
    tokens, full, host_s, verifies, drafts_verified = [], [], 0.0, 0, 0
    done: list[int] = []  # finished during the step: in the batch until the step ends
    while queue or left:
        if planner.pass_idx % (args.k + 1) == 0:
            # Step boundary, as in SGLang's scheduler: finished requests leave, new ones join.
            for rid in done:
                del left[rid]
                planner.release(rid)
            done = []
            while queue and len(left) < args.batch:
                rid = queue.pop(0)
                left[rid] = lengths[rid]
                planner.admit(rid)
        start = time.perf_counter()
        roles = planner.next_pass()
        host_s += time.perf_counter() - start
        tokens.append(roles.num_tokens)
        full.append(len(left) == args.batch)
        for rid, drafts in roles.verify.items():
            verifies += 1
            drafts_verified += drafts
            left[rid] -= _accepted(rng, drafts, args.accept_prob)
            if left[rid] <= 0:
                done.append(rid)
    return {**_stats(tokens, full, args.k + 1), "host_us_per_pass": 1e6 * host_s / len(tokens),
            "mean_drafts_per_verify": drafts_verified / verifies,
            "shortened_cycles": planner.shortened_cycles, "verifies": verifies}


def simulate_lockstep(args: argparse.Namespace, lengths: list[int]) -> dict:
    rng = random.Random(args.seed)
    queue, left, tokens, full = list(range(len(lengths))), {}, [], []
    while queue or left:
        while queue and len(left) < args.batch:
            rid = queue.pop(0)
            left[rid] = lengths[rid]
        is_full = len(left) == args.batch
        tokens += [len(left)] * args.k + [len(left) * (args.k + 1)]
        full += [is_full] * (args.k + 1)
        for rid in list(left):
            left[rid] -= _accepted(rng, args.k, args.accept_prob)
            if left[rid] <= 0:
                del left[rid]
    return _stats(tokens, full, args.k + 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--min-output", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=4096)
    ap.add_argument("--accept-prob", type=float, default=0.85,
                    help="per-draft acceptance probability (0.85 at k 8: ~5 tokens per verify)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_output, args.max_output) for _ in range(args.num_requests)]
    report = {"command": " ".join(sys.argv), "args": vars(args),
              "unified": simulate_unified(args, lengths), "lockstep": simulate_lockstep(args, lengths)}
    Path(args.out).write_text(json.dumps(report, indent=1))
    for name in ("unified", "lockstep"):
        r = report[name]
        print(f"{name}: tokens per pass max/min {r.get('max_min_ratio_full_batch', float('nan')):.3f} "
              f"(full batch), {r['max_min_ratio_all']:.2f} (all passes)", flush=True)
    u = report["unified"]
    print(f"unified: {u['host_us_per_pass']:.1f} us host time per pass, {u['mean_drafts_per_verify']:.2f} "
          f"drafts per verify, {u['shortened_cycles']} shortened cycles of {u['verifies']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
