"""Adaptive speculation: which requests draft sparsely and which decode densely, decided per step.

Pure host-side policy (no torch): the unified schedule asks it, once per scheduler step, which
requests speculate in the coming k + 1 passes; the others are *dense rows*, a plain decode
step of their request inside each pass (one exact token per pass, full attention, no verify;
``unified.py``).

Cost model. A decode-time forward pass is memory-bound: it reads the weights once, every KV token
its rows attend to, and does work per row; a pass that carries a plan (draft or verify rows)
also pays the plan's fixed cost over a plain decode forward (its inputs, the selection's top-K,
the verify's scores, and whatever host time the GPU waits for), so its time is

    T = a + plan * [the pass carries a plan] + b * kv_tokens + c * rows.

Over one scheduler step (k + 1 passes) a request that decodes densely reads its context C in each
pass and yields k + 1 tokens; a speculating request drafts k tokens through its sparse selection
(sinks + K selected + the dense tail of the tokens since its last verify), verifies once over its
whole context with k + 1 rows, and yields its accepted drafts + 1 tokens:

    dense:      time (k + 1) * (b * C + c)                          tokens k + 1
    speculate:  time b * (k * (sinks + K + tail) + C) + c * (2k + 1)  tokens accepted + 1

Self-speculation never yields more tokens per pass than dense decoding (its drafts cost a pass
each); it wins only by reading less KV. So speculating request i saves time s_i and gives up
g_i = k - accepted_i tokens, and the step's throughput N / T (with the fixed (k + 1) * a in T)
rises iff s_i / g_i exceeds the step's time per token T / N. ``decide`` takes the requests in
order of s_i / g_i while that holds (Dinkelbach: the set maximising N / T with the plan's cost
(k + 1) * plan in T), and keeps it only if its N / T beats the all-dense step's, which pays no
plan. A weight-bound step (small batch, short contexts: large a against the KV terms) or one
whose plan costs more than the KV it saves therefore decodes densely, and a KV-bound step (large
batch, long contexts) speculates the requests that accept well.
K is the selection policy's (``selection.SelectionPolicy``, the one home of K), the tail averages
k / 2 + 1 tokens, and ``accepted`` is the request's own exponential moving average of accepted
drafts per verify. ``a, plan, b, c`` start from a prior (the model shape and the GPU's bandwidth)
and are refitted online from measured pass times (recursive least squares with forgetting,
``PassCostFit``).

Hysteresis: a request switches mode only when its ratio clears the step's time per token by
``margin`` in the switching direction and it has spent ``min_steps`` steps in its current one. A
dense request yields no acceptance, so every ``probe_steps`` steps (one clock for the whole batch,
so that the probes share their planned passes) the dense requests whose contexts have grown
speculate again for ``min_steps`` steps to re-measure (their acceptance, and the plan's cost),
if the step would pay for that at the acceptance assumed of an unmeasured request with a free
plan (so a weight-bound step never probes). With every request dense, a step is k + 1 plain
decode passes.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from sparsespec_sglang.selection import SelectionPolicy


@dataclass(frozen=True)
class PassCost:
    """T = a + plan * planned + b * kv_tokens + c * rows, in seconds (``planned``: the pass carries
    draft or verify rows; an all-dense pass is a plain decode forward)."""

    a: float
    b: float
    c: float
    plan: float = 0.0

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c, self.plan) < 0:
            raise ValueError(f"pass cost terms must be >= 0 (got {self})")

    def seconds(self, kv_tokens: float, rows: float, planned: bool = True) -> float:
        return self.a + self.plan * planned + self.b * kv_tokens + self.c * rows

    @staticmethod
    def prior(weight_bytes: float, kv_bytes_per_token: float, bandwidth: float,
              row_seconds: float = 0.0, plan_seconds: float = 0.0) -> "PassCost":
        """From the model shape: the weights and each KV token read once at ``bandwidth`` bytes/s."""
        if bandwidth <= 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s (got {bandwidth})")
        return PassCost(weight_bytes / bandwidth, kv_bytes_per_token / bandwidth, row_seconds, plan_seconds)


class PassCostFit:
    """Recursive least squares over (1, planned, kv_tokens, rows) -> seconds, forgetting old passes
    at ``forget`` per sample, starting from a prior that counts as ``prior_weight`` passes.

    The covariance's trace is held at or below the prior's: a direction the passes do not excite
    (e.g. ``planned`` while every pass carries a plan) would otherwise grow by 1 / forget per
    sample without bound and make the next informative pass swing the estimate."""

    # Regressors are scaled to order one (a pass reads ~10^5-10^6 KV tokens over ~10^2-10^3
    # rows) so the update stays well conditioned in double precision.
    SCALE = (1.0, 1.0, 1e5, 1e2)

    def __init__(self, prior: PassCost, forget: float = 0.99, prior_weight: float = 1.0) -> None:
        if not 0 < forget <= 1 or prior_weight <= 0:
            raise ValueError(f"forget must be in (0, 1] and prior_weight > 0 (got {forget}, {prior_weight})")
        self.forget = forget
        n = len(self.SCALE)
        self.theta = [t * s for t, s in zip((prior.a, prior.plan, prior.b, prior.c), self.SCALE)]
        self.P = [[1.0 / prior_weight if i == j else 0.0 for j in range(n)] for i in range(n)]
        self.max_trace = n / prior_weight
        self.samples = 0

    @property
    def cost(self) -> PassCost:
        a, plan, b, c = (max(t, 0.0) / s for t, s in zip(self.theta, self.SCALE))
        return PassCost(a, b, c, plan)

    def observe(self, kv_tokens: float, rows: float, seconds: float, planned: bool = True) -> None:
        n = len(self.SCALE)
        x = [1.0, float(planned), float(kv_tokens) / self.SCALE[2], float(rows) / self.SCALE[3]]
        Px = [sum(self.P[i][j] * x[j] for j in range(n)) for i in range(n)]
        denom = self.forget + sum(x[i] * Px[i] for i in range(n))
        gain = [v / denom for v in Px]
        err = seconds - sum(t * xi for t, xi in zip(self.theta, x))
        self.theta = [t + g * err for t, g in zip(self.theta, gain)]
        self.P = [[(self.P[i][j] - gain[i] * Px[j]) / self.forget for j in range(n)] for i in range(n)]
        trace = sum(self.P[i][i] for i in range(n))
        if trace > self.max_trace:
            self.P = [[v * self.max_trace / trace for v in row] for row in self.P]
        self.samples += 1


@dataclass
class _Request:
    accepted_ema: float
    speculating: bool
    steps_in_mode: int = 0
    context_at_switch: int = 0


@dataclass
class AdaptivePolicy:
    """Per-request choice between speculating and decoding densely (see the module docstring)."""

    k: int
    selection: SelectionPolicy
    cost: PassCostFit
    prior_accepted: float | None = None  # a new request's acceptance guess (default k / 2)
    ema_weight: float = 0.25  # weight of the newest verify in the acceptance EMA
    margin: float = 0.1  # the other mode must be this much cheaper per token to switch
    min_steps: int = 4  # steps in a mode before a switch
    probe_steps: int = 64  # dense steps before speculating again to re-measure
    _requests: dict[Hashable, _Request] = field(default_factory=dict)
    # KV tokens one draft step of each request of the last ``decide`` attends to (its cost model's
    # input; the schedule's pass-cost observations reuse it)
    drafted: dict[Hashable, float] = field(default_factory=dict)
    _steps: int = 0  # decisions so far: the probes' clock

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 (got {self.k})")
        if not 0 < self.ema_weight <= 1 or self.margin < 0 or self.min_steps < 1 or self.probe_steps < 1:
            raise ValueError("ema_weight in (0, 1], margin >= 0, min_steps >= 1 and probe_steps >= 1 are required")
        if self.prior_accepted is None:
            self.prior_accepted = self.k / 2

    # ------------------------------------------------------------------ costs of one step

    def drafted_tokens(self, context_len: int) -> float:
        """KV tokens one draft step of a request attends to: sinks, K selected, the dense tail."""
        k_sel = self.selection.num_selected(context_len, cand_end=context_len)
        sinks = min(self.selection.num_sink, context_len)
        tail = self.k / 2 + 1  # the tokens since the last verify, on average over a cycle
        return min(sinks + k_sel + tail, context_len + self.k)

    def dense_seconds(self, context_len: int) -> float:
        """A request's share of one step (k + 1 passes) when it decodes densely."""
        cost = self.cost.cost
        return (self.k + 1) * (cost.b * context_len + cost.c)

    def speculative_seconds(self, context_len: int) -> float:
        """A request's share of one step when it speculates (k drafts and one verify)."""
        cost = self.cost.cost
        kv = self.k * self.drafted_tokens(context_len) + context_len
        return cost.b * kv + cost.c * (2 * self.k + 1)

    def saved_seconds(self, context_len: int) -> float:
        """Step time a request saves by speculating instead of decoding densely."""
        return self.dense_seconds(context_len) - self.speculative_seconds(context_len)

    def fixed_seconds(self, planned: bool) -> float:
        """The step's cost paid whatever the mix: the weights read in each of its k + 1 passes,
        and the plan's cost in each when any request speculates."""
        cost = self.cost.cost
        return (self.k + 1) * (cost.a + cost.plan * planned)

    def ratio(self, context_len: int, accepted: float) -> float:
        """Seconds saved per token given up when the request speculates instead of decoding densely
        (inf: it gives up none and saves time; -inf: it saves no time)."""
        saved = self.saved_seconds(context_len)
        given_up = self.k - accepted
        if saved <= 0:
            return float("-inf")
        return float("inf") if given_up <= 0 else saved / given_up

    def break_even_accepted(self, context_len: int, seconds_per_token: float) -> float:
        """Accepted drafts per verify above which speculating pays at a step time per token."""
        saved = self.saved_seconds(context_len)
        return self.k - saved / seconds_per_token if saved > 0 else float("inf")

    def step_seconds_per_token(self, contexts: Mapping[Hashable, int], speculating: Mapping[Hashable, bool],
                               accepted: Mapping[Hashable, float] | None = None, free_plan: bool = False) -> float:
        """T / N of a step with the given modes (for speculating requests, their ``accepted``
        drafts per verify if given there, else their acceptance EMAs; ``free_plan``: as if a
        plan cost nothing)."""
        accepted = accepted or {}
        t, n = self.fixed_seconds(not free_plan and any(speculating[rid] for rid in contexts)), 0.0
        for rid, c in contexts.items():
            if speculating[rid]:
                t += self.speculative_seconds(c)
                n += accepted.get(rid, self._acceptance(rid)) + 1
            else:
                t += self.dense_seconds(c)
                n += self.k + 1
        return t / n if n else float("inf")

    # ------------------------------------------------------------------ observations

    def observe_verify(self, rid: Hashable, accepted: int) -> None:
        """A speculating request verified and accepted ``accepted`` drafts."""
        req = self._requests.get(rid)
        if req is not None:
            req.accepted_ema += self.ema_weight * (accepted - req.accepted_ema)

    def observe_pass(self, kv_tokens: float, rows: int, seconds: float, planned: bool = True) -> None:
        self.cost.observe(kv_tokens, rows, seconds, planned)

    def forget(self, rid: Hashable) -> None:
        self._requests.pop(rid, None)

    def accepted_ema(self, rid: Hashable) -> float:
        return self._requests[rid].accepted_ema

    # ------------------------------------------------------------------ the choice

    def _acceptance(self, rid: Hashable) -> float:
        req = self._requests.get(rid)
        return self.prior_accepted if req is None else req.accepted_ema

    def decide(self, contexts: Mapping[Hashable, int]) -> dict[Hashable, bool]:
        """For each running request (its context length): True to speculate in the coming step.
        Requests not seen before start with the prior acceptance."""
        self.drafted = {rid: self.drafted_tokens(c) for rid, c in contexts.items()}
        ratios = {rid: self.ratio(c, self._acceptance(rid)) for rid, c in contexts.items()}
        # The throughput-maximising set: best ratios first, while each beats the step's T / N
        # (with the plan's cost); kept only if it beats the all-dense step, which pays no plan.
        dense_t = sum(self.dense_seconds(c) for c in contexts.values())
        n_all = float((self.k + 1) * len(contexts))
        t, n, chosen = self.fixed_seconds(True) + dense_t, n_all, 0
        for rid in sorted(ratios, key=ratios.__getitem__, reverse=True):
            if n <= 0 or ratios[rid] <= t / n:
                break
            t -= self.saved_seconds(contexts[rid])
            n -= self.k - self._acceptance(rid)
            chosen += 1
        all_dense = (self.fixed_seconds(False) + dense_t) / n_all if n_all else float("inf")
        dense_step = not (chosen and n > 0 and t / n < all_dense)
        threshold = float("inf") if dense_step else t / n
        self._steps += 1
        probe = self._steps % self.probe_steps == 0
        out: dict[Hashable, bool] = {}
        grown: list[Hashable] = []  # on a probe step: dense requests whose contexts grew since they switched
        for rid, c in contexts.items():
            req = self._requests.get(rid)
            if req is None:
                req = self._requests[rid] = _Request(self.prior_accepted, ratios[rid] > threshold, 0, c)
            else:
                req.steps_in_mode += 1
                if req.steps_in_mode >= self.min_steps:
                    if req.speculating and (dense_step or ratios[rid] < threshold * (1 - self.margin)):
                        self._switch(req, False, c)
                    elif not req.speculating and ratios[rid] > threshold * (1 + self.margin):
                        self._switch(req, True, c)
                    elif not req.speculating and probe and c > req.context_at_switch:
                        grown.append(rid)
            out[rid] = req.speculating
        if grown:
            self._probe(contexts, out, grown)
        return out

    def _probe(self, contexts: Mapping[Hashable, int], modes: dict[Hashable, bool],
               grown: list[Hashable]) -> None:
        """A dense request measures nothing, so its acceptance ages as its context grows, and an
        all-dense server never measures what a plan costs: the ``grown`` ones speculate again
        (all together, sharing the planned passes) to re-measure both, if the step would pay for
        that were both as good as assumed before measuring (the prior's acceptance, or their own
        if higher; a free plan). Probes that could not pay even then (a weight-bound step, short
        contexts) would only cost time."""
        hoped = {rid: max(self._acceptance(rid), self.prior_accepted) for rid in grown}
        trial = {**modes, **{rid: True for rid in grown}}
        if (self.step_seconds_per_token(contexts, trial, hoped, free_plan=True)
                < self.step_seconds_per_token(contexts, modes, free_plan=True)):
            for rid in grown:
                self._switch(self._requests[rid], True, contexts[rid])
                modes[rid] = True

    @staticmethod
    def _switch(req: _Request, speculating: bool, context_len: int) -> None:
        req.speculating = speculating
        req.steps_in_mode = 0
        req.context_at_switch = context_len
