"""Phase planning for unified draft/verify batching (paper section 4.2).

Lockstep runs k draft passes of B tokens and then one verify pass of B * (k + 1) tokens, so the
GEMM batch swings by (k + 1)x and the verify pass is compute-bound. Unified batching gives every
request a phase offset in 0..k: in the passes whose index is congruent to its offset the request
verifies (its pending token + the drafts made since its last verify), in every other pass it
drafts one token. With the offsets spread evenly, each pass carries ~B / (k + 1) verifying
requests and a flat ~B + k * B / (k + 1) tokens.

``PhasePlanner`` keeps the offsets balanced as requests arrive and finish: a newcomer joins the
least-loaded offset (its first cycle has fewer than k drafts so that it lands there), and when
finishes leave two offsets more than one request apart, a request of the fullest offset moves to
the emptiest one by verifying early once (a shorter cycle, never a longer one: a request never
waits and never drafts more than k tokens ahead, so the KV reserved per request stays k + 1).
It is pure host-side bookkeeping; ``scripts/sim_phases.py`` measures the per-pass token counts
it produces, and ``unified.py`` runs its passes on the GPU.

Steps: SGLang's speculative scheduler expects every request to verify exactly once per scheduler
step. The unified schedule runs k + 1 passes per step, so the planner admits requests only at step
boundaries and rebalances only there too: a move then only pulls a request's verify earlier
*within the coming step*, never into the step it already verified in.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class PassRoles:
    """Who does what in one forward pass: verifying requests with their draft counts, drafting
    requests."""

    verify: dict[Hashable, int]  # request -> drafts to verify (the pass has drafts + 1 of its tokens)
    draft: dict[Hashable, int]  # request -> drafts it already made since its last verify

    @property
    def num_tokens(self) -> int:
        return len(self.draft) + sum(d + 1 for d in self.verify.values())


class PhasePlanner:
    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.period = k + 1  # passes per step
        self.pass_idx = 0  # index of the next pass
        self.offset: dict[Hashable, int] = {}
        self.next_verify: dict[Hashable, int] = {}  # pass index of each request's next verify
        self.last_verify: dict[Hashable, int] = {}  # pass index after which its current drafts began
        self.counts = [0] * self.period
        self.shortened_cycles = 0

    def __len__(self) -> int:
        return len(self.offset)

    def admit(self, rid: Hashable) -> int:
        """A prefilled request joins from the next pass on; returns its offset.

        Its first pass drafts, so it can verify 1..k passes later (d passes later = d drafts):
        every offset but the next pass's. Least-loaded of those; among them, the latest (most
        drafts before the first verify)."""
        if rid in self.offset:
            raise ValueError(f"request {rid!r} is already planned")
        if self.pass_idx % self.period:
            raise ValueError("the planner admits requests at step boundaries only")
        dist = {o: (o - self.pass_idx) % self.period for o in range(self.period)}
        offset = min((o for o in dist if dist[o]), key=lambda o: (self.counts[o], -dist[o]))
        self.offset[rid] = offset
        self.next_verify[rid] = self.pass_idx + dist[offset]
        self.last_verify[rid] = self.pass_idx - 1
        self.counts[offset] += 1
        return offset

    def release(self, rid: Hashable) -> None:
        """A request finished or left (abort, retraction)."""
        self.counts[self.offset.pop(rid)] -= 1
        del self.next_verify[rid], self.last_verify[rid]

    def next_pass(self) -> PassRoles:
        """The next pass's roles, and advance: its verifying requests start a new cycle after it."""
        verify, draft = {}, {}
        for rid, t in self.next_verify.items():
            made = self.pass_idx - self.last_verify[rid] - 1
            if t == self.pass_idx:
                verify[rid] = made
            else:
                draft[rid] = made
        for rid in verify:
            self.last_verify[rid] = self.pass_idx
            self.next_verify[rid] = self.pass_idx + self.period
        self.pass_idx += 1
        if self.pass_idx % self.period == 0:
            self._rebalance()
        return PassRoles(verify, draft)

    def _rebalance(self) -> None:
        """Move requests between offsets until no two counts differ by more than one.

        A request can only verify earlier, so it moves from offset a to offset b only when b's
        next pass comes before a's; the largest imbalance that allows it goes first."""
        dist = [(o - self.pass_idx) % self.period for o in range(self.period)]
        while True:
            pairs = sorted(((self.counts[a] - self.counts[b], dist[b], a, b)
                            for a in range(self.period) for b in range(self.period)
                            if self.counts[a] - self.counts[b] > 1 and dist[b] < dist[a]), reverse=True)
            for _, _, a, b in pairs:
                target = self.pass_idx + dist[b]
                # Of offset a's requests, the one whose short cycle keeps the most drafts (>= 1:
                # a verify of the pending token alone would be a plain decode step).
                rid = min((r for r, o in self.offset.items() if o == a), key=self.last_verify.__getitem__)
                if target - self.last_verify[rid] - 1 >= 1:
                    break
            else:
                return
            self.offset[rid] = b
            self.next_verify[rid] = target
            self.counts[a] -= 1
            self.counts[b] += 1
            self.shortened_cycles += 1
