"""PhasePlanner: unified batching's per-pass plan stays flat and never drafts beyond k (CPU)."""

import random
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from sparsespec_sglang.phases import PhasePlanner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import sim_phases  # noqa: E402


def test_a_full_batch_spreads_over_all_offsets_and_verifies_once_per_cycle():
    k, batch = 8, 128
    planner = PhasePlanner(k)
    for rid in range(batch):
        planner.admit(rid)
    assert planner.counts[0] == 0  # pass 0 is everyone's first draft: nobody can verify in it
    seen = {rid: [] for rid in range(batch)}
    plans = [planner.next_pass() for _ in range(5 * (k + 1))]
    for i, plan in enumerate(plans):
        assert set(plan.verify) | set(plan.draft) == set(range(batch))
        assert not set(plan.verify) & set(plan.draft)
        for rid, drafts in plan.verify.items():
            seen[rid].append(i)
            assert 1 <= drafts <= k
    assert max(planner.counts) - min(planner.counts) <= 1  # rebalanced within the first cycle
    for passes in seen.values():  # after the first two cycles: one verify every k + 1 passes
        assert all(b - a == k + 1 for a, b in zip(passes[1:], passes[2:]))
    steady = [p.num_tokens for p in plans[2 * (k + 1):]]
    assert max(steady) / min(steady) <= (batch + k * 15) / (batch + k * 14)


def test_finishes_are_rebalanced_by_shortening_cycles_only():
    k = 4
    planner = PhasePlanner(k)
    for rid in range(50):
        planner.admit(rid)
    for _ in range(k + 1):
        planner.next_pass()
    for rid in [r for r, o in planner.offset.items() if o == 0]:  # empty one offset
        planner.release(rid)
    last = {}
    for i in range(3 * (k + 1)):
        plan = planner.next_pass()
        for rid, drafts in plan.verify.items():
            assert 1 <= drafts <= k
            if rid in last:
                assert i - last[rid] <= k + 1  # never waits longer than a cycle
            last[rid] = i
    assert max(planner.counts) - min(planner.counts) <= 1
    assert planner.shortened_cycles > 0


def test_random_arrivals_and_finishes_keep_the_invariants():
    rng = random.Random(3)
    k, planner, live, next_id = 6, PhasePlanner(6), set(), 0
    for _ in range(2000):
        while planner.pass_idx % (k + 1) == 0 and len(live) < 40 and rng.random() < 0.7:
            planner.admit(next_id)
            live.add(next_id)
            next_id += 1
        plan = planner.next_pass()
        assert set(plan.verify) | set(plan.draft) == live
        assert all(1 <= d <= k for d in plan.verify.values())
        for rid in list(plan.verify):
            if rng.random() < 0.1:
                planner.release(rid)
                live.remove(rid)
        assert sum(planner.counts) == len(planner) == len(live)


def test_bad_input():
    with pytest.raises(ValueError, match="k must be >= 1"):
        PhasePlanner(0)
    planner = PhasePlanner(2)
    planner.admit("a")
    with pytest.raises(ValueError, match="already planned"):
        planner.admit("a")


def test_simulated_run_of_128_requests_is_flat_and_lockstep_is_not():
    """Joins, finishes and rebalancing at step boundaries only (as the server runs the planner):
    the full batch's passes stay within 1.4x of each other (measured 1.39), lockstep's swing 9x."""
    args = Namespace(batch=128, k=8, accept_prob=0.85, seed=0)
    lengths = [random.Random(0).randint(256, 1024) for _ in range(256)]
    unified, lockstep = sim_phases.simulate_unified(args, lengths), sim_phases.simulate_lockstep(args, lengths)
    assert unified["max_min_ratio_full_batch"] <= 1.4
    assert lockstep["max_min_ratio_full_batch"] == pytest.approx(9.0)


def test_every_request_verifies_once_per_step():
    """The unified schedule's contract with SGLang: k + 1 passes per step, one verify each."""
    k, planner, live, next_id = 4, PhasePlanner(4), set(), 0
    rng = random.Random(1)
    for step in range(60):
        for rid in [r for r in live if rng.random() < 0.15]:  # finishes between steps
            planner.release(rid)
            live.discard(rid)
        while len(live) < 12 and rng.random() < 0.7:  # joins between steps
            planner.admit(next_id)
            live.add(next_id)
            next_id += 1
        verifies = {rid: 0 for rid in live}
        for _ in range(k + 1):
            plan = planner.next_pass()
            for rid, made in plan.draft.items():
                assert 0 <= made < k
            for rid, drafts in plan.verify.items():
                assert 1 <= drafts <= k
                verifies[rid] += 1
        assert set(verifies.values()) <= {1}, f"step {step}: {verifies}"
    with pytest.raises(ValueError, match="step boundaries"):
        planner.next_pass()
        planner.admit(next_id)


def test_requests_switching_to_dense_and_back_leave_and_rejoin_at_step_boundaries():
    """Adaptive speculation: a request that decodes densely has no phase (it leaves the planner
    at a step boundary); when it speculates again it rejoins as a newcomer: a first cycle that
    drafts before it verifies, and still one verify per step. Offsets stay balanced."""
    k, planner = 3, PhasePlanner(3)
    rng = random.Random(3)
    live = set(range(16))
    for rid in live:
        planner.admit(rid)
    speculating = set(live)
    for step in range(50):
        for rid in live:
            if rng.random() < 0.2:  # the policy's choice, at the step boundary
                if rid in speculating:
                    planner.release(rid)
                    speculating.discard(rid)
                else:
                    assert planner.admit(rid) != planner.pass_idx % planner.period  # drafts first
                    speculating.add(rid)
        assert set(planner.offset) == speculating
        verifies = {rid: 0 for rid in speculating}
        for j in range(k + 1):
            roles = planner.next_pass()
            assert set(roles.draft) | set(roles.verify) == speculating  # dense requests have no role
            for rid in roles.verify:
                verifies[rid] += 1
        assert set(verifies.values()) <= {1}, f"step {step}: {verifies}"
        assert max(planner.counts) - min(planner.counts) <= 2
