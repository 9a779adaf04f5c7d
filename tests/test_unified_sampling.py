"""The unified schedule's sampled acceptance on the CPU: SPARSESPEC's tokens follow plain sampling.

The toy model of toy_model.py gets a spread next-token distribution (a fixed table of logits per
(token, position)); draft rows propose its argmax, so drafts are accepted only part of the time.
Everything from the schedule to SGLang's own ``eagle_sample`` is the real code; only
sgl_kernel's CUDA sampling ops are PyTorch stand-ins (cpu_sgl_kernel.py) and ``eagle_sample``'s
CPU shortcut (argmax whatever the temperature) is switched off. Two groups of requests with
different sampling parameters share every batch. Each group's first three output tokens are
compared, by a chi-square test of homogeneity, with samples drawn by plain SGLang's own PyTorch
sampler (``top_k_top_p_min_p_sampling_from_probs_torch``) from the same model.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang.acceptance import sample_like_plain
from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.schedule import ScheduleContext
from sparsespec_sglang.unified import UnifiedSchedule
import cpu_sgl_kernel
from toy_model import VOCAB, ToyBackend, ToyModelRunner, patch_sglang, toy_req

scipy_stats = pytest.importorskip("scipy.stats")

K, PROMPT_LEN, FIRST, BATCH, ROUNDS, TOKENS = 4, 20, 11, 256, 6, 3
TABLE = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(5)) * 2.5


def table_row(token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return (token.long() * 31 + pos.long() * 7 + 3) % VOCAB


class SpreadRunner(ToyModelRunner):
    """Every row's logits are the table row of its (token, position): drafts are its argmax."""

    def forward(self, fb):
        logits = TABLE[table_row(fb.input_ids, fb.seq_lens - 1)].clone()
        return SimpleNamespace(logits_output=SimpleNamespace(next_token_logits=logits))


# (temperature, top_k, top_p, min_p) of the two interleaved groups; the third pair takes plain's
# own filtering path (top-k with top-p), the fourth min-p.
CASES = {
    "temperature": ((1.0, VOCAB, 1.0, 0.0), (0.6, VOCAB, 1.0, 0.0)),
    "top_p, top_k": ((1.0, VOCAB, 0.8, 0.0), (0.8, 5, 1.0, 0.0)),
    "top_k with top_p": ((1.0, 6, 0.9, 0.0), (1.2, 3, 0.95, 0.0)),
    "min_p": ((1.0, VOCAB, 1.0, 0.2), (1.3, VOCAB, 1.0, 0.05)),
}


def sampling_info(params: list[tuple[float, int, float, float]]) -> SimpleNamespace:
    t, k, p, m = (torch.tensor(col) for col in zip(*params))
    return SimpleNamespace(
        is_all_greedy=False, temperatures=t.float().view(-1, 1), top_ks=k.int(), top_ps=p.float(),
        min_ps=m.float(), need_top_k_sampling=bool((k < VOCAB).any()), need_top_p_sampling=bool((p < 1).any()),
        need_min_p_sampling=bool((m > 0).any()), acc_additive_penalties=None, acc_scaling_penalties=None,
        logit_bias=None, sampling_seed=None)


def patch_sampling(monkeypatch) -> None:
    """The toy model's SGLang stand-ins, then the real acceptance (see the module docstring)."""
    patch_sglang(monkeypatch)
    monkeypatch.setattr("sparsespec_sglang.acceptance.sample_like_plain", sample_like_plain)
    cpu_sgl_kernel.sampled_eagle_sample_on_cpu(monkeypatch)


def sparsespec_samples(params: list[tuple[float, int, float, float]],
                       dense: bool = False) -> tuple[list[tuple[int, ...]], float]:
    """The first TOKENS output tokens of every request over ROUNDS batches, and the mean accepted
    drafts per cycle. ``dense``: adaptive speculation with every other pair of requests decoding
    densely (a scripted choice), so each group has dense and speculating requests."""
    num_rows = BATCH + 1
    req_to_token = torch.arange(num_rows * 64, dtype=torch.int32).view(num_rows, 64)
    config = SparseSpecConfig(num_draft_steps=K, schedule="unified")
    state = PillarState(config, 2, 4, 2, req_to_token, group_scores=UnifiedSchedule.group_scores(K, num_rows))
    backend = ToyBackend()
    runner = UnifiedSchedule(ScheduleContext(
        k=K, state=state, backend=backend, model_runner=SpreadRunner(backend), target_worker=None,
        sampling_backend="pytorch", delayed_verification=True, adaptive=dense))
    if dense:
        real = runner.policy.decide  # runs too (its bookkeeping), its choice overridden
        runner.policy.decide = lambda contexts: real(contexts) and {row: (row - 1) % 4 < 2 for row in contexts}
    rows = torch.arange(1, num_rows)
    samples, accepted, cycles = [], 0, 0
    for _ in range(ROUNDS):
        runner.forget(rows.tolist())
        state.init_window(rows, torch.full((BATCH,), PROMPT_LEN))
        state.set_pending(rows, torch.full((BATCH,), FIRST))
        emitted = [[] for _ in range(BATCH)]
        seq = torch.full((BATCH,), PROMPT_LEN)
        while min(len(e) for e in emitted) < TOKENS:
            order = torch.randperm(BATCH)  # SGLang reorders a batch between steps
            batch = SimpleNamespace(
                reqs=[toy_req(int(r)) for r in rows[order]],
                req_pool_indices=rows[order], seq_lens=seq[order], seq_lens_cpu=seq[order], seq_lens_sum=None,
                forward_mode=None, input_ids=None, out_cache_loc=None, spec_info=None, return_logprob=False,
                sampling_info=sampling_info([params[i] for i in order.tolist()]))
            result = runner.step(batch, [int(r) for r in rows[order]])
            assert len(runner.dense) == (BATCH // 2 if dense else 0)
            tokens = result.accept_tokens.view(BATCH, K + 1)
            for i, n in zip(order.tolist(), result.accept_lens.tolist()):
                emitted[i] += tokens[order == i][0, :n].tolist()
            speculating = [(int(r) - 1) % 4 < 2 or not dense for r in rows[order]]
            lens = result.accept_lens.tolist()
            accepted += sum(n - 1 for n, s in zip(lens, speculating) if s)
            cycles += sum(speculating)
            seq[order] = result.new_seq_lens
        samples += [tuple(e[:TOKENS]) for e in emitted]
    return samples, accepted / cycles


def plain_samples(param: tuple[float, int, float, float], n: int) -> list[tuple[int, ...]]:
    """n sequences of TOKENS tokens, each drawn by plain SGLang's PyTorch sampler."""
    from sglang.srt.layers.sampler import top_k_top_p_min_p_sampling_from_probs_torch

    t, k, p, m = param
    token = torch.full((n,), FIRST)
    out = []
    for j in range(TOKENS):
        probs = torch.softmax(TABLE[table_row(token, torch.full((n,), PROMPT_LEN + j))] / t, dim=-1)
        token = top_k_top_p_min_p_sampling_from_probs_torch(
            probs, torch.full((n,), k), torch.full((n,), p), torch.full((n,), m), m > 0, None, None).view(-1)
        out.append(token)
    return [tuple(row) for row in torch.stack(out, dim=1).tolist()]


def homogeneity_p(a: list, b: list) -> float:
    """Chi-square test that two samples come from one distribution (cells under 5 expected
    counts pooled into one)."""
    ca, cb = Counter(a), Counter(b)
    keys = sorted(set(ca) | set(cb), key=lambda x: -(ca[x] + cb[x]))
    na, nb = len(a), len(b)
    table, rest = [], [0, 0]
    for key in keys:
        if (ca[key] + cb[key]) * min(na, nb) / (na + nb) >= 5:
            table.append([ca[key], cb[key]])
        else:
            rest[0] += ca[key]
            rest[1] += cb[key]
    if sum(rest):
        table.append(rest)
    assert len(table) >= 3, "too few cells for a test"
    return float(scipy_stats.chi2_contingency(table).pvalue)


@pytest.mark.parametrize("case, dense", [*((case, False) for case in CASES), ("top_k with top_p", True),
                                         ("min_p", True)])
def test_sampled_unified_steps_follow_plain_sampling(case, dense, monkeypatch):
    """``dense``: half the requests decode densely (adaptive speculation): their one-token chains
    are sampled with their own parameters, so each group still follows plain sampling."""
    patch_sampling(monkeypatch)
    groups = CASES[case]
    torch.manual_seed(1)
    samples, mean_accepted = sparsespec_samples([groups[i % 2] for i in range(BATCH)], dense)
    assert 0.5 < mean_accepted < K - 0.5, mean_accepted  # drafts partly accepted
    for g, param in enumerate(groups):
        spec = samples[g::2]
        plain = plain_samples(param, len(spec))
        for j in range(TOKENS):  # each position, then the joint of the first two
            p = homogeneity_p([s[j] for s in spec], [s[j] for s in plain])
            assert p > 1e-4, f"{case}, group {g}, token {j}: p = {p:.2e}"
        p = homogeneity_p([s[:2] for s in spec], [s[:2] for s in plain])
        assert p > 1e-4, f"{case}, group {g}, tokens 0-1 jointly: p = {p:.2e}"
