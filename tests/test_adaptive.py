"""The adaptive-speculation policy (sparsespec_sglang/adaptive.py) on synthetic batches."""

from __future__ import annotations

import random

import pytest

from sparsespec_sglang.adaptive import AdaptivePolicy, PassCost, PassCostFit
from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.selection import SelectionPolicy

# Qwen3-8B on an H100-class GPU: 16.4 GB of weights, 144 KiB of KV per token, 3.35 TB/s.
PRIOR = PassCost.prior(16.4e9, 144 * 1024, 3.35e12, row_seconds=2e-6)


def _policy(**kw) -> AdaptivePolicy:
    sel = SelectionPolicy.of(SparseSpecConfig())
    return AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(PRIOR), **kw)


def _batch(n: int, context_len: int, prefix: str = "r") -> dict[str, int]:
    return {f"{prefix}{i}": context_len for i in range(n)}


def test_break_even_follows_the_bytes():
    """A weight-bound step (few requests) makes tokens precious: speculation needs more than k
    accepted drafts, i.e. never; a KV-bound step (128 x 12K) lets ~1 accepted draft pay."""
    pol = _policy()
    dense = lambda ctx: {r: False for r in ctx}  # noqa: E731
    small, big = _batch(2, 12_000), _batch(128, 12_000)
    assert pol.break_even_accepted(12_000, pol.step_seconds_per_token(small, dense(small))) > 6
    assert pol.break_even_accepted(12_000, pol.step_seconds_per_token(big, dense(big))) < 1.5
    # at the break-even the step's throughput is the same whichever mode the request takes
    ctx = _batch(64, 6000)
    lam = pol.step_seconds_per_token(ctx, dense(ctx))
    acc = pol.break_even_accepted(6000, lam)
    assert pol.ratio(6000, acc) == pytest.approx(lam)


def test_weight_bound_steps_decode_densely_and_kv_bound_ones_speculate():
    pol = _policy()
    assert not any(pol.decide(_batch(2, 12_000, "few")).values())  # weights dominate each pass
    assert not any(pol.decide(_batch(128, 300, "short")).values())  # short contexts
    assert all(pol.decide(_batch(128, 12_000, "long")).values())  # KV dominates: speculate


def test_the_chosen_modes_maximise_the_steps_throughput():
    """Mixed contexts: the chosen set gives a lower time per token than all-dense, all-speculating
    and every single flip of it (the Dinkelbach set is a local, here global, optimum)."""
    pol = _policy()
    ctx = {**_batch(40, 500, "s"), **_batch(40, 16_000, "l"), **_batch(20, 4000, "m")}
    modes = pol.decide(ctx)
    best = pol.step_seconds_per_token(ctx, modes)
    assert best < pol.step_seconds_per_token(ctx, {r: False for r in ctx})
    assert best < pol.step_seconds_per_token(ctx, {r: True for r in ctx})
    for r in ctx:
        flipped = {**modes, r: not modes[r]}
        assert best <= pol.step_seconds_per_token(ctx, flipped) * (1 + 1e-12), r
    assert all(modes[f"l{i}"] for i in range(40)) and not any(modes[f"s{i}"] for i in range(40))


def test_a_low_acceptance_request_falls_back_and_others_stay():
    """8 requests at 12K: the weights still weigh in each pass, so a request that accepts nothing
    gives up more tokens than its saved reads are worth; one that accepts 6 of 8 keeps speculating.
    (In a KV-bound batch, e.g. 128 x 12K, even 0 accepted pays: a dense row reads its whole context
    in every pass.)"""
    pol = _policy(min_steps=3)
    ctx = _batch(8, 12_000)
    pol.decide(ctx)
    for _ in range(12):
        for r in ctx:
            pol.observe_verify(r, 0 if r == "r0" else 6)
        modes = pol.decide(ctx)
    assert modes["r0"] is False and all(modes[r] for r in ctx if r != "r0")
    assert pol.accepted_ema("r0") < 0.2 < 5.5 < pol.accepted_ema("r1")


def test_no_flapping_near_the_break_even():
    """Acceptance that wanders around the break-even changes the mode rarely (margin + min steps)."""
    pol = _policy(min_steps=4, probe_steps=10_000)
    ctx = _batch(64, 6000)
    lam = pol.step_seconds_per_token(ctx, {r: False for r in ctx})
    edge = pol.break_even_accepted(6000, lam)
    rng = random.Random(0)
    switches, last = 0, None
    for _ in range(400):
        spec = pol.decide(ctx)["r0"]
        switches += last is not None and spec != last
        last = spec
        for r in ctx:
            pol.observe_verify(r, max(0, min(8, round(edge + rng.uniform(-1.0, 1.0)))))
    assert switches <= 6


def test_a_dense_request_probes_again_when_its_context_grew():
    """A request that fell back (it accepted nothing) speculates again after ``probe_steps``
    steps once its context grew, to re-measure; in a weight-bound step, where speculating could
    not pay even at the prior's acceptance, it never does."""
    pol = _policy(min_steps=2, probe_steps=5)
    ctx = _batch(32, 6000)  # speculating pays above ~2.4 accepted drafts, so at the prior's 4
    assert all(pol.decide(ctx).values())
    for _ in range(10):
        pol.observe_verify("r0", 0)
        pol.decide(ctx)
    assert pol.decide(ctx)["r0"] is False
    modes = [pol.decide({**ctx, "r0": 6000 + 9 * i})["r0"] for i in range(1, 8)]
    assert True in modes  # re-measured after probe_steps dense steps
    pol.forget("r0")
    with pytest.raises(KeyError):
        pol.accepted_ema("r0")

    few = _policy(min_steps=2, probe_steps=5)
    ctx = _batch(8, 12_000)  # weight-bound
    for i in range(40):
        assert not any(few.decide({r: c + 9 * i for r, c in ctx.items()}).values())


def test_the_cost_fit_recovers_the_pass_model():
    true = PassCost(0.006, 3.0e-8, 1.5e-6, plan=0.002)
    fit = PassCostFit(PassCost(0.01, 1e-8, 0.0), forget=1.0)
    rng = random.Random(1)
    for i in range(400):
        kv, rows, planned = rng.uniform(1e5, 4e5), rng.uniform(100, 800), i % 3 != 0
        fit.observe(kv, rows, true.seconds(kv, rows, planned) * (1 + rng.uniform(-0.01, 0.01)), planned)
    got = fit.cost
    assert got.a == pytest.approx(true.a, rel=0.1)
    assert got.plan == pytest.approx(true.plan, rel=0.2)
    assert got.b == pytest.approx(true.b, rel=0.05)
    assert got.c == pytest.approx(true.c, rel=0.3)


def test_the_cost_fit_stays_bounded_while_every_pass_carries_a_plan():
    """Thousands of planned passes leave the plain/planned split unexcited: the covariance must
    not wind up, so the first plain passes afterwards move the estimate to the truth, not past it."""
    true = PassCost(0.004, 2.0e-8, 1.0e-6, plan=0.003)
    fit = PassCostFit(PassCost(0.004, 2.0e-8, 1.0e-6), forget=0.99)
    rng = random.Random(2)
    for _ in range(5000):
        kv, rows = rng.uniform(1e5, 4e5), rng.uniform(100, 800)
        fit.observe(kv, rows, true.seconds(kv, rows, True), True)
    assert sum(fit.P[i][i] for i in range(4)) <= fit.max_trace * (1 + 1e-9)
    assert fit.cost.a + fit.cost.plan == pytest.approx(true.a + true.plan, rel=0.05)
    for _ in range(60):
        kv, rows = rng.uniform(1e5, 4e5), rng.uniform(100, 800)
        fit.observe(kv, rows, true.seconds(kv, rows, False), False)
        fit.observe(kv, rows, true.seconds(kv, rows, True), True)
    assert fit.cost.plan == pytest.approx(true.plan, rel=0.25)
    assert fit.cost.a == pytest.approx(true.a, rel=0.25)


def test_a_plan_that_costs_more_than_the_kv_it_saves_makes_the_whole_step_dense():
    """A small model at moderate contexts (SmolLM2-135M-like: 0.27 GB of weights, 23 KB of KV per
    token): with no plan cost 128 x 3K requests would speculate; once each planned pass costs
    2 ms more than a plain decode forward, every request decodes densely, and speculation comes
    back where the contexts make the KV read dominate again."""
    sel = SelectionPolicy.of(SparseSpecConfig())
    free = PassCost.prior(0.27e9, 23_040, 3.35e12, row_seconds=1e-7)
    costly = PassCost(free.a, free.b, free.c, plan=2e-3)
    ctx = _batch(128, 3000)
    assert all(AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(free)).decide(ctx).values())
    pol = AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(costly))
    modes = pol.decide(ctx)
    assert not any(modes.values())
    assert pol.step_seconds_per_token(ctx, modes) < pol.step_seconds_per_token(ctx, {r: True for r in ctx})
    assert all(AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(costly)).decide(_batch(128, 60_000)).values())


@pytest.mark.parametrize("kw", [dict(k=0), dict(ema_weight=0.0), dict(margin=-0.1), dict(min_steps=0)])
def test_bad_settings_are_refused(kw):
    sel = SelectionPolicy.of(SparseSpecConfig())
    args = {"k": 8, "selection": sel, "cost": PassCostFit(PRIOR), **kw}
    with pytest.raises(ValueError):
        AdaptivePolicy(**args)
    with pytest.raises(ValueError):
        PassCost(-1.0, 0.0, 0.0)


def test_dense_requests_probe_together():
    """Requests that joined at different steps and fell back (they accepted nothing) re-measure
    on the same steps: every step with a speculating request carries a plan for the whole batch,
    so staggered probes would make almost every step pay one."""
    pol = _policy(min_steps=4, probe_steps=32)
    joins = {0: "a", 3: "b", 7: "c", 11: "d"}
    ctx: dict[str, int] = {}
    planned = []
    for step in range(200):
        if step in joins:
            ctx.update(_batch(32, 6000, joins[step]))
        ctx = {r: c + 9 for r, c in ctx.items()}
        modes = pol.decide(ctx)
        for r, speculating in modes.items():
            if speculating:
                pol.observe_verify(r, 0)
        planned.append(any(modes.values()))
    late = planned[40:]  # every request has measured and fallen back
    assert 0 < sum(late) <= (len(late) // 32 + 1) * 4


def test_a_request_that_accepts_everything_still_leaves_a_dense_step():
    """Accepting every draft makes a request's ratio infinite (it gives up no tokens), yet when the
    plan costs more than every speculating set saves, it decodes densely with the rest."""
    sel = SelectionPolicy.of(SparseSpecConfig())
    free = PassCost.prior(0.27e9, 23_040, 3.35e12, row_seconds=1e-7)
    pol = AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(free), prior_accepted=8.0, min_steps=2,
                         probe_steps=10_000)
    ctx = _batch(16, 3000)
    assert all(pol.decide(ctx).values())
    for _ in range(3):
        for r in ctx:
            pol.observe_verify(r, 8)
        pol.decide(ctx)
    assert pol.ratio(3000, pol.accepted_ema("r0")) == float("inf")
    pol.cost = PassCostFit(PassCost(free.a, free.b, free.c, plan=0.05))  # a plan now costs 50 ms a pass
    modes = [pol.decide(ctx) for _ in range(3)][-1]
    assert not any(modes.values())


# SmolLM2-135M on an H100 as measured (docs/results.md, "Real weights"): plain Triton decode steps
# of 2.25 ms at 65K pool tokens and 8.1 ms at 526K give a = 1.43 ms and b = 12.7 ns per KV token
# (a latency-bound forward, ~18x its weights' read time); a planned pass's forward plus its
# inputs and acceptance cost ~0.67 ms more. The prior is the shape's (weights 0.27 GB, 23,040
# bytes of KV per token, the schedule's priors).
SMOLLM2_H100 = PassCost(a=1.43e-3, b=12.7e-9, c=0.7e-6, plan=0.67e-3)
SMOLLM2_PRIOR = PassCost.prior(0.27e9, 23_040, 3.35e12, row_seconds=2 * 135e6 / 4e14, plan_seconds=1.2e-3)


def _simulate(choose, true_cost: PassCost, batch: int, accepted: int, output_len: int,
              policy: AdaptivePolicy | None = None) -> tuple[float, list[tuple[float, int]]]:
    """Decode ``batch`` requests of ``output_len`` tokens from 150-token prompts, step by step:
    ``choose(contexts)`` gives each request's mode, each of the k + 1 passes costs ``true_cost``
    of what its rows read (each speculating request verifies in one pass, drafts in the others),
    a speculating request accepts ``accepted`` drafts. The policy, if given, observes every pass
    and verify. Returns output tokens per second and (mean context, speculating requests) per
    step."""
    k = 8
    sel = SelectionPolicy.of(SparseSpecConfig())
    drafted = AdaptivePolicy(k, sel, PassCostFit(true_cost)).drafted_tokens
    ctx, done = {i: 150 for i in range(batch)}, {i: 0 for i in range(batch)}
    seconds, tokens, trace = 0.0, 0, []
    while ctx:
        modes = choose(ctx)
        spec = [r for r in ctx if modes[r]]
        for j in range(k + 1):
            verifying = set(spec[j::k + 1])
            kv = sum(ctx[r] + j for r in ctx if not modes[r])
            kv += sum(ctx[r] if r in verifying else drafted(ctx[r]) for r in spec)
            rows = len(ctx) + k * len(verifying)
            t = true_cost.seconds(kv, rows, planned=bool(spec))
            seconds += t
            if policy is not None:
                policy.observe_pass(kv, rows, t, planned=bool(spec))
        trace.append((sum(ctx.values()) / len(ctx), len(spec)))
        for r in list(ctx):
            n = k + 1
            if modes[r]:
                n = accepted + 1
                if policy is not None:
                    policy.observe_verify(r, accepted)
            ctx[r] += n
            done[r] += n
            tokens += n
            if done[r] >= output_len:
                del ctx[r]
                if policy is not None:
                    policy.forget(r)
    return tokens / seconds, trace


@pytest.mark.parametrize("batch, accepted", [(128, 4), (128, 1), (32, 4)])
def test_from_the_shape_prior_the_policy_learns_a_latency_bound_model_and_beats_both_fixed_modes(batch, accepted):
    """SmolLM2's passes cost ~18x what the shape prior says (a latency-bound forward): learning
    from the passes it measures, the policy decodes densely while contexts are short, speculates
    every request past the measured break-even (~2.5K tokens at B 128 and 4 accepted drafts;
    never at 1, nor at B 32, where the weights' fixed cost per pass outweighs the KV saved), and
    its throughput is at least that of the better fixed mode (all dense = plain decoding, or all
    speculating = fixed SPARSESPEC)."""
    sel = SelectionPolicy.of(SparseSpecConfig())
    policy = AdaptivePolicy(k=8, selection=sel, cost=PassCostFit(SMOLLM2_PRIOR))
    run = dict(true_cost=SMOLLM2_H100, batch=batch, accepted=accepted, output_len=4096)
    adaptive, trace = _simulate(policy.decide, policy=policy, **run)
    dense, _ = _simulate(lambda ctx: {r: False for r in ctx}, **run)
    speculating, _ = _simulate(lambda ctx: {r: True for r in ctx}, **run)
    # the probes (speculating steps to re-measure) are all it may give up where one mode wins
    assert adaptive >= 0.985 * max(dense, speculating)
    short = [n for c, n in trace[1:] if c < 1500]
    assert short and sum(short) == 0
    long = [n for c, n in trace if c > 3000]
    assert long
    if (batch, accepted) == (128, 4):
        assert speculating < dense  # fixed SPARSESPEC loses on this model...
        assert adaptive > dense * 1.05  # ...yet speculating where contexts are long pays
        assert min(long) == batch
    elif batch == 128:
        assert dense > speculating  # speculating never pays at 1 of 8
        assert sum(long) <= 4 * batch * (len(long) // policy.probe_steps + 1)  # probes only
    else:
        assert sum(n for _, n in trace[1:]) == 0  # weight-bound: not even a probe
