"""Adaptive speculation on the CPU: unified steps that mix dense and speculating requests.

The toy model of toy_model.py stands in for SGLang's model runner (a draft row gets a wrong token
at some positions, so drafts are rejected at ragged points; a dense row is exact: it is not a
draft). The policy's choice is scripted (requests switch modes mid-output, some steps are all
dense, some all speculating); everything else is the real unified schedule: the dense rows in the
pass, their acceptance as one-token chains, PillarState's transitions, the planner's joins and
leaves, the measurements the policy is fed. Every request's output must equal the target's greedy
sequence at every token.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.forward_plan import PlanKind
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.schedule import ScheduleContext
from sparsespec_sglang.unified import UnifiedSchedule, model_shape_prior
from toy_model import VOCAB, ToyBackend, ToyModelRunner, greedy_chain_accept, patch_sglang, target_next, toy_req

NUM_ROWS, MAX_CTX = 24, 2048


def make_schedule(k: int, adaptive: bool = True, tp_group=None):
    config = SparseSpecConfig(num_draft_steps=k, schedule="unified", adaptive="on" if adaptive else "off")
    req_to_token = torch.arange(NUM_ROWS * MAX_CTX, dtype=torch.int32).view(NUM_ROWS, MAX_CTX)
    state = PillarState(config, 2, 4, 2, req_to_token, group_scores=UnifiedSchedule.group_scores(k, NUM_ROWS))
    backend = ToyBackend()
    model = ToyModelRunner(backend)
    model.state = state
    ctx = ScheduleContext(k=k, state=state, backend=backend, model_runner=model, target_worker=None,
                          sampling_backend="flashinfer", delayed_verification=True, adaptive=adaptive,
                          tp_group=tp_group)
    return UnifiedSchedule(ctx), state, model


def test_the_policy_exists_only_when_adaptive_is_on():
    schedule, _, model = make_schedule(3, adaptive=False)
    assert schedule.policy is None
    schedule, _, model = make_schedule(3)
    # The prior from the model's shape: its weights and each token's KV (2 layers x 2 heads x
    # (8 + 8) fp32 values) read once at the prior bandwidth.
    prior = model_shape_prior(model)
    assert prior.a == pytest.approx((8 * 8 + 8) * 4 / 3.35e12)
    assert prior.b == pytest.approx(2 * 2 * 16 * 4 / 3.35e12) and prior.c > 0
    assert schedule.policy.cost.cost == prior and schedule.policy.k == 3


@pytest.mark.parametrize("k, sampled", [(3, False), (8, False), (4, True)])
def test_mixed_dense_and_speculating_steps_emit_the_target_sequence(k, sampled, monkeypatch):
    """``sampled``: a non-greedy batch: a dense row's one-token chain is accepted with its own
    request's sampling parameters (temperature = pool row), as a verifying request's chain is."""
    patch_sglang(monkeypatch)
    rng = random.Random(10 * k + sampled)
    schedule, state, model = make_schedule(k)
    w = k + 1
    widths = []

    def accept(verify_input, batch, logits_output, grammar_mask, sampling_backend):
        n = verify_input.draft_token_num
        widths.append(n)
        if sampled:
            # the pass's rows: the chains' first rows are the requests' input rows
            info = batch.sampling_info
            assert n in (1, w)
            rows = verify_input.draft_token.shape[0] // n
            assert info.temperatures.shape[0] == rows and info.top_ks.shape[0] == rows
            assert torch.equal(info.top_ks, info.temperatures.view(-1).int() * 2)
            assert set(info.temperatures.view(-1).int().tolist()) <= expected_rows[n]
        return greedy_chain_accept(verify_input, batch, logits_output)

    monkeypatch.setattr("sparsespec_sglang.acceptance.sample_like_plain", accept)
    # The policy's choice, scripted: a request keeps its mode or switches (probability 0.3);
    # every 7th step all dense, every 11th all speculating.
    mode: dict[int, bool] = {}
    step_no = [0]

    def decide(contexts):
        n = step_no[0]
        for row in contexts:
            if row not in mode or rng.random() < 0.3:
                mode[row] = rng.random() < 0.5
            if n % 7 == 3:
                mode[row] = False
            elif n % 11 == 5:
                mode[row] = True
        return {row: mode[row] for row in contexts}

    real_decide = schedule.policy.decide  # runs too (its bookkeeping), its choice overridden
    verified: list[tuple[int, int]] = []
    passes: list[tuple[int, bool]] = []
    real_verify, real_pass = schedule.policy.observe_verify, schedule.policy.observe_pass
    monkeypatch.setattr(schedule.policy, "observe_verify",
                        lambda row, n: verified.append((row, n)) or real_verify(row, n))
    monkeypatch.setattr(schedule.policy, "observe_pass",
                        lambda kv, rows, s, planned: passes.append((rows, planned)) or real_pass(kv, rows, s, planned))

    free, live, expected, emitted = list(range(1, NUM_ROWS)), {}, {}, {}
    kinds_seen, switched_in, expected_rows = set(), 0, {}
    for step in range(70):
        step_no[0] = step
        for row in [r for r, req in live.items() if len(emitted[r]) >= req.max_new]:
            live.pop(row)
            free.append(row)
            mode.pop(row, None)
        while free and len(live) < 10 and rng.random() < 0.5:
            row = free.pop(rng.randrange(len(free)))
            prompt_len, last = rng.randint(5, 40), rng.randrange(VOCAB)
            seq = [int(target_next(torch.tensor(last), torch.tensor(prompt_len - 1)))]
            for p in range(prompt_len, prompt_len + 300):
                seq.append(int(target_next(torch.tensor(seq[-1]), torch.tensor(p))))
            expected[row], emitted[row] = seq, [seq[0]]
            live[row] = toy_req(row, seq_len=prompt_len, max_new=rng.randint(20, 150))
            state.init_window(torch.tensor([row]), torch.tensor([prompt_len]))
            state.set_pending(torch.tensor([row]), torch.tensor([seq[0]]))
            schedule.forget([row])
        if not live:
            continue
        order = list(live)
        rng.shuffle(order)
        reqs = [live[r] for r in order]
        seq_lens = torch.tensor([r.seq_len for r in reqs])
        batch = SimpleNamespace(
            reqs=reqs, req_pool_indices=torch.tensor(order), seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(),
            seq_lens_sum=None, forward_mode=None, input_ids=None, out_cache_loc=None, spec_info=None,
            return_logprob=False, sampling_info=SimpleNamespace(
                is_all_greedy=not sampled, acc_additive_penalties=None, acc_scaling_penalties=None,
                logit_bias=None))
        if sampled:
            pool = batch.req_pool_indices.to(torch.int32)
            batch.sampling_info.temperatures = pool.float().view(-1, 1)
            batch.sampling_info.top_ks = pool * 2
        was_dense = set(schedule.dense)
        decided = decide({r: 0 for r in order})  # what the step will be told (decide is replayable)
        step_no[0] = step
        mode.update(decided)
        monkeypatch.setattr(schedule.policy, "decide",
                            lambda contexts: real_decide(contexts) and {r: decided[r] for r in contexts})
        dense = {r for r in order if not decided[r]}
        expected_rows = {1: dense, w: set(order) - dense}
        model.forwards.clear()
        model.pass_rows.clear()
        model.written.clear()
        verified.clear()
        passes.clear()
        result = schedule.step(batch, order)
        schedule._read_measurements()  # a CPU's measurements are ready at once
        # Who is dense is the policy's choice; the planner holds exactly the speculating requests.
        assert schedule.dense == dense and set(schedule.planner.offset) == set(order) - dense
        kinds = {kind for kind, _ in model.forwards}
        assert len(model.forwards) == w
        # All dense: every pass is a plain decode forward, no plan on the batch.
        assert kinds == ({None} if len(dense) == len(order) else {PlanKind.UNIFIED_PASS})
        kinds_seen |= kinds
        lens = result.accept_lens.tolist()
        tokens = result.accept_tokens.view(len(order), w)
        for i, row in enumerate(order):
            n = lens[i]
            assert n == w if row in dense else 1 <= n <= w
            emitted[row] += tokens[i, :n].tolist()
            assert int(result.new_seq_lens[i]) == live[row].seq_len + n
            got = emitted[row]
            assert got == expected[row][:len(got)], f"step {step} request {row} ({'dense' if row in dense else 'spec'})"
            # KV written this step: a dense row k + 1 positions, a speculating one at most 2k + 1
            # past its committed length (patches/kv_reserve.py reserves 3 (k + 1)).
            written = [p for rows_, ps in model.written for r, p in zip(rows_, ps) if r == row]
            start = live[row].seq_len
            if row in dense:
                assert sorted(written) == list(range(start, start + w))
            else:
                assert max(written) <= start + 2 * k
            live[row].seq_len += n
        # Dense rows read their whole context: no selection, dense from position 0, in the plan
        # and in their PillarState; a request that just stopped being dense drafts first from the
        # first-step window at its committed length.
        for pass_rows in model.pass_rows:
            for pool_row, sparse_row, ds, sl, state_ds, state_sl in pass_rows:
                if pool_row in dense:
                    assert sparse_row and (ds, sl, state_ds, state_sl) == (0, 0, 0, 0)
        for row in (was_dense & set(order)) - dense:
            first = next(r for r in model.pass_rows[0] if r[0] == row)
            start = int(seq_lens[order.index(row)])
            assert first[1] and first[4] == start and first[5] == state.selection.num_selected(start, cand_end=start)
            switched_in += 1
        # The policy was fed every pass (its rows, and whether it carried a plan) and every
        # speculating request's verify.
        assert passes == [(n, kind is not None) for kind, n in model.forwards]
        spec_lens = {row: lens[i] - 1 for i, row in enumerate(order) if row not in dense}
        assert dict(verified) == spec_lens and len(verified) == len(spec_lens)
    assert kinds_seen == {None, PlanKind.UNIFIED_PASS} and switched_in > 5
    assert sum(len(e) for e in emitted.values()) > 800
    assert set(widths) == {1, w}
    shares = schedule.profiler.summary()
    assert 0 < shares["speculating_requests_share"] <= 1 and 0 <= shares["speculating_tokens_share"] <= 1


def test_without_adaptive_speculation_every_request_speculates(monkeypatch):
    """--sparsespec-adaptive off: no policy, no dense rows, every pass carries a plan."""
    patch_sglang(monkeypatch)
    schedule, state, model = make_schedule(3, adaptive=False)
    rows = [1, 2, 3]
    state.init_window(torch.tensor(rows), torch.tensor([20, 30, 40]))
    state.set_pending(torch.tensor(rows), torch.tensor([1, 2, 3]))
    seq_lens = torch.tensor([20, 30, 40])
    batch = SimpleNamespace(
        reqs=[toy_req(r) for r in rows], req_pool_indices=torch.tensor(rows), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens.clone(), seq_lens_sum=None, forward_mode=None, input_ids=None,
        out_cache_loc=None, spec_info=None, return_logprob=False, sampling_info=SimpleNamespace(
            is_all_greedy=True, acc_additive_penalties=None, acc_scaling_penalties=None, logit_bias=None))
    schedule.step(batch, rows)
    assert {kind for kind, _ in model.forwards} == {PlanKind.UNIFIED_PASS} and not schedule.dense
    assert schedule.profiler.summary()["speculating_requests_share"] == 1.0


@pytest.mark.parametrize("kv_bound", [False, True])
def test_the_worker_with_the_real_policy_emits_the_target_sequence(monkeypatch, kv_bound):
    """--sparsespec-adaptive on through the worker, the policy choosing from its own cost model and
    measurements (host-timed passes on a CPU, where a pass's fixed cost dominates: once measured,
    every request decodes densely) or, ``kv_bound``, from a pass cost whose KV term dominates and
    that the measurements barely move (requests speculate once their context outgrows a draft
    step's reads, so short ones switch mid-output). Every request's output is the target's."""
    from test_lockstep import Requests, _apply, make_worker

    from sparsespec_sglang.adaptive import PassCost, PassCostFit

    worker, runner, _ = make_worker(monkeypatch, "unified", k=3, adaptive="on")
    schedule = worker.schedule
    if kv_bound:
        schedule.policy.cost = PassCostFit(PassCost(1e-3, 1e-3, 0.0), prior_weight=1e12)
    requests = Requests(5)
    steps, shares, started = 0, [], 0
    for step in range(40):
        requests.finish()
        if requests.rng.random() < 0.4 and requests.free:
            batch = requests.prefill_batch(requests.rng.randint(1, 3))
            _apply(worker.forward_batch_generation(batch), batch, 3)
        if not requests.live:
            continue
        batch = requests.decode_batch()
        dense_before = set(schedule.dense)
        _apply(worker.forward_batch_generation(batch), batch, 3)  # asserts the target sequence
        rows = {r.req_pool_idx for r in batch.reqs}
        assert set(schedule.policy.drafted) == rows
        shares.append(1 - len(schedule.dense & rows) / len(rows))
        started += len((dense_before & rows) - schedule.dense)
        steps += 1
    assert steps > 30 and schedule.policy.cost.samples > 0
    if kv_bound:
        assert 0 < min(shares) and max(shares) == 1 and started > 0
    else:
        assert max(shares[-10:]) == 0


def test_all_dense_passes_capture_and_replay_on_the_dense_backend(monkeypatch):
    """--sparsespec-dense-backend flashinfer: the worker builds that SGLang backend once, the plain
    decode graphs (all-dense passes) capture on it and replay in its forward context, while the
    unified passes' and lockstep drafts' graphs keep the SPARSESPEC backend."""
    from test_lockstep import make_worker

    from sparsespec_sglang import forward_graphs

    built = []

    class DenseBackend:
        def __init__(self, model_runner):
            built.append(model_runner)

    monkeypatch.setattr("sparsespec_sglang.worker.ATTENTION_BACKENDS", {"flashinfer": DenseBackend})
    worker, runner, _ = make_worker(monkeypatch, "unified", k=3, adaptive="on", dense_backend="flashinfer")
    schedule = worker.schedule
    assert built == [runner] and isinstance(schedule.plain.backend, DenseBackend)
    assert schedule.graphs.backend is worker.backend

    captured = {}

    class Runner:
        capture_bs = [1, 2, 4]

        def __init__(self, model_runner, plan, capture_sizes=None, attn_backend=None):
            captured[plan is None] = attn_backend

        def can_run_graph(self, forward_batch):
            return True

        def execute(self, forward_batch):
            from sglang.srt.model_executor.forward_context import get_attn_backend
            contexts.append(get_attn_backend())
            return SimpleNamespace(next_token_logits=torch.zeros(forward_batch.input_ids.shape[0], 4))

    contexts = []
    monkeypatch.setattr(forward_graphs, "SingleTokenGraphRunner", Runner)
    schedule.capture_graphs(4)
    assert isinstance(captured[True], DenseBackend) and captured[False] is worker.backend
    fb = SimpleNamespace(spec_info=None, input_ids=torch.zeros(2, dtype=torch.int64), moe_num_token_non_padded=None)
    schedule.plain.run(fb)
    assert len(contexts) == 1 and isinstance(contexts[0], DenseBackend)


class LoopbackGroup:
    """Two TP ranks in one process: the first rank's flags reach the second in call order (as
    TPGroup.agree's broadcast delivers them)."""

    def __init__(self, rank: int, mailbox: list) -> None:
        self.chooses, self.mailbox = rank == 0, mailbox

    def agree(self, flags, n):
        if self.chooses:
            assert len(flags) == n
            self.mailbox.append(list(flags))
            return list(flags)
        got = self.mailbox.pop(0)
        assert len(got) == n
        return got


def test_tensor_parallel_ranks_take_the_first_ranks_modes(monkeypatch):
    """Under tensor parallelism only the group's first rank has a policy; the other rank, whose
    own pass timings would differ, runs exactly its modes: the same dense rows and planner in
    every step, the same tokens, every one the target's."""
    patch_sglang(monkeypatch)
    mailbox: list = []
    ranks = [make_schedule(3, tp_group=LoopbackGroup(r, mailbox)) for r in (0, 1)]
    first, second = ranks[0][0], ranks[1][0]
    assert first.policy is not None and second.policy is None and second.adaptive
    rng = random.Random(5)
    real_decide = first.policy.decide
    # The first rank's choices, scripted on top of its real bookkeeping: each request flips
    # with probability 0.3.
    mode: dict[int, bool] = {}

    def decide(contexts):
        real_decide(contexts)
        for row in contexts:
            if row not in mode or rng.random() < 0.3:
                mode[row] = rng.random() < 0.5
        return {row: mode[row] for row in contexts}

    monkeypatch.setattr(first.policy, "decide", decide)
    live = {}
    for row in range(1, 9):
        prompt_len, last = rng.randint(5, 40), rng.randrange(VOCAB)
        seq = [int(target_next(torch.tensor(last), torch.tensor(prompt_len - 1)))]
        for p in range(prompt_len, prompt_len + 200):
            seq.append(int(target_next(torch.tensor(seq[-1]), torch.tensor(p))))
        live[row] = [prompt_len, seq, [seq[0]]]
        for _, state, _ in ranks:
            state.init_window(torch.tensor([row]), torch.tensor([prompt_len]))
            state.set_pending(torch.tensor([row]), torch.tensor([seq[0]]))
    switches = 0
    for step in range(25):
        order = list(live)
        rng.shuffle(order)
        results, before = [], set(first.dense)
        for schedule, _, _ in ranks:
            seq_lens = torch.tensor([live[r][0] for r in order])
            batch = SimpleNamespace(
                reqs=[toy_req(r) for r in order], req_pool_indices=torch.tensor(order), seq_lens=seq_lens,
                seq_lens_cpu=seq_lens.clone(), seq_lens_sum=None, forward_mode=None, input_ids=None,
                out_cache_loc=None, spec_info=None, return_logprob=False, sampling_info=SimpleNamespace(
                    is_all_greedy=True, acc_additive_penalties=None, acc_scaling_penalties=None, logit_bias=None))
            results.append(schedule.step(batch, order))
        assert not mailbox
        assert first.dense == second.dense and first.planner.offset == second.planner.offset
        switches += len(before ^ first.dense)
        assert torch.equal(results[0].accept_lens, results[1].accept_lens)
        assert torch.equal(results[0].accept_tokens, results[1].accept_tokens)
        tokens = results[0].accept_tokens.view(len(order), 4)
        for i, row in enumerate(order):
            n = int(results[0].accept_lens[i])
            live[row][2] += tokens[i, :n].tolist()
            live[row][0] += n
            assert live[row][2] == live[row][1][:len(live[row][2])], f"step {step} request {row}"
    assert switches > 10
