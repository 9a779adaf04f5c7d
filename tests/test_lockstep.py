"""SparseSpecWorker + LockstepSchedule on the CPU: prefill bookkeeping and lockstep cycles.

The toy target model of ``toy_model.py`` stands in for SGLang's model runner and target worker;
the worker, both schedules, PillarState, the backend and the plans on the batches are the real ones.
Requests are prefilled, decoded in lockstep cycles (drafts rejected at ragged points) and must
emit exactly the target's own greedy sequence; a unified server sends logprob batches to the
lockstep fallback and forgets those requests' unified drafts.
"""

from __future__ import annotations

import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sparsespec_sglang.attention import plan_of
from sparsespec_sglang.forward_plan import DraftStep, ForwardPlan, MixedRows, PlanKind
from sparsespec_sglang.schedule import BORROWED_FIELDS, SCHEDULES, schedule_class
from sparsespec_sglang.worker import SparseSpecWorker
from toy_model import (VOCAB, ToyBackend, ToyModelRunner, ToyTargetWorker, patch_sglang, sparsespec_record, toy_req,
                       target_sequence)

NUM_ROWS, MAX_CTX = 16, 1024


class FakeEvent:
    """A CUDA event stand-in: 1 ms of GPU time between consecutive records, always complete."""

    clock = 0.0

    def record(self):
        FakeEvent.clock += 1.0
        self.t = FakeEvent.clock

    def query(self):
        return True

    def elapsed_time(self, other):
        return other.t - self.t


@contextlib.contextmanager
def sglang_runtime(tp_rank: int = 0, tp_size: int = 1, **settings):
    """SGLang's runtime context of a scheduler process, where the worker reads its settings."""
    from sglang.srt.runtime_context import get_context, get_parallel

    settings = {"device": "cuda", "sampling_backend": "pytorch", "enable_metrics": False,
                "served_model_name": "toy", **settings}
    with get_context().override_server_args(**settings), get_parallel().override(
            tp_rank=tp_rank, tp_size=tp_size, attn_tp_size=tp_size, moe_tp_size=tp_size):
        yield


def patch_worker_runtime(monkeypatch) -> None:
    """What building and stepping a worker needs of SGLang and CUDA on a CPU: the toy model's
    stand-ins, no stream recording, CUDA events that tick 1 ms apart."""
    patch_sglang(monkeypatch)
    monkeypatch.setattr("sparsespec_sglang.worker.record_stream_for_v2_verify", lambda *a: None)
    monkeypatch.setattr("sparsespec_sglang.profiling.torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("sparsespec_sglang.profiling.torch.cuda.Event", lambda **_: FakeEvent())


def make_worker(monkeypatch, schedule: str, k: int = 3, score_norm: str = "exact", adaptive: str = "off",
                dense_backend: str = "triton", **runtime):
    patch_worker_runtime(monkeypatch)
    req_to_token = torch.arange(NUM_ROWS * MAX_CTX, dtype=torch.int32).view(NUM_ROWS, MAX_CTX)
    backend = ToyBackend()
    runner = ToyModelRunner(backend)
    runner.model_config = SimpleNamespace(num_hidden_layers=2, heads_asked=[])
    runner.model_config.get_num_attention_heads = lambda tp: runner.model_config.heads_asked.append(tp) or 4
    runner.token_to_kv_pool.head_num = 2
    runner.attn_backend = backend
    runner.decode_cuda_graph_runner = None  # no CUDA graphs: every forward is eager
    target = ToyTargetWorker(runner, req_to_token)
    server_args = sparsespec_record(k, {"sparsespec_schedule": schedule, "sparsespec_score_norm": score_norm,
                                        "sparsespec_adaptive": adaptive, "sparsespec_dense_backend": dense_backend,
                                        "sparsespec_min_selected": 4, "sparsespec_max_selected": 32})
    with sglang_runtime(**runtime):
        # As SGLang's scheduler builds and initialises a draft worker (keyword arguments).
        worker = SparseSpecWorker(server_args=server_args, gpu_id=0, nccl_port=0, target_worker=target)
        pool, allocator = target.get_memory_pool()
        worker.alloc_memory_pool(memory_pool_config=None, req_to_token_pool=pool,
                                 token_to_kv_pool_allocator=allocator)
        worker.init_attention_backends()
        worker.init_cuda_graphs()
    return worker, runner, target


@pytest.mark.parametrize("tp_rank", [0, 1])
def test_the_worker_takes_the_settings_sglang_resolved(monkeypatch, tp_rank):
    exported = []
    monkeypatch.setattr("sparsespec_sglang.worker.CycleProfiler.export_metrics",
                        lambda self, labels: exported.append((self, labels)))
    worker, runner, _ = make_worker(monkeypatch, "unified", tp_rank=tp_rank, tp_size=2,
                                    sampling_backend="flashinfer", enable_metrics=True,
                                    served_model_name="served")
    assert worker.tp_rank == tp_rank
    # Query heads per rank: the model's heads split over the tensor-parallel group.
    assert runner.model_config.heads_asked == [2]
    assert all(s.ctx.sampling_backend == "flashinfer" for s in worker.schedules.values())
    # Only the first rank exports the configured schedule's phase times.
    assert exported == ([(worker.schedule.profiler, {"model_name": "served"})] if tp_rank == 0 else [])


class Requests:
    """Live requests of a toy server: their pool rows, lengths and expected continuations."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.free = list(range(1, NUM_ROWS))  # row 0 is SGLang's reserved padding row
        self.live: dict[int, SimpleNamespace] = {}
        self.next_id = 0

    def prefill_batch(self, n: int) -> SimpleNamespace:
        reqs = []
        for _ in range(min(n, len(self.free))):
            row = self.free.pop(self.rng.randrange(len(self.free)))
            prompt_len, last = self.rng.randint(5, 60), self.rng.randrange(VOCAB)
            req = toy_req(row, rid=self.next_id, seq_len=prompt_len, last=last,
                          max_new=self.rng.randint(10, 60),
                          expected=target_sequence(last, prompt_len, 200), emitted=[])
            self.live[self.next_id] = req
            self.next_id += 1
            reqs.append(req)
        batch = self._batch(reqs, ForwardMode.EXTEND)
        batch.input_ids_last = torch.tensor([r.last for r in reqs])
        return batch

    def decode_batch(self, return_logprob: bool = False) -> SimpleNamespace:
        reqs = list(self.live.values())
        self.rng.shuffle(reqs)  # SGLang reorders and filters the batch between steps
        batch = self._batch(reqs, ForwardMode.DECODE)
        batch.return_logprob = return_logprob
        return batch

    def finish(self) -> None:
        for rid in [r for r, req in self.live.items() if len(req.emitted) >= req.max_new]:
            self.free.append(self.live.pop(rid).req_pool_idx)

    @staticmethod
    def _batch(reqs, mode) -> SimpleNamespace:
        seq_lens = torch.tensor([r.seq_len for r in reqs])
        return SimpleNamespace(
            reqs=reqs, req_pool_indices=torch.tensor([r.req_pool_idx for r in reqs]),
            seq_lens=seq_lens, seq_lens_cpu=seq_lens.clone(), seq_lens_sum=None, forward_mode=mode,
            input_ids=None, out_cache_loc=None, spec_info=None, return_logprob=False,
            has_grammar=False, sampling_info=SimpleNamespace(
                is_all_greedy=True, acc_additive_penalties=None, acc_scaling_penalties=None, logit_bias=None))


def _apply(result, batch, k: int) -> list[int]:
    """Fold a step's result into its requests (as SGLang's scheduler would); accept lens."""
    tokens = result.next_draft_input.accept_tokens.view(len(batch.reqs), k + 1)
    lens = result.accept_lens.tolist()
    for i, req in enumerate(batch.reqs):
        req.emitted += tokens[i, :lens[i]].tolist()
        assert int(result.new_seq_lens[i]) == req.seq_len + (lens[i] if batch.forward_mode.is_decode() else 0)
        req.seq_len = int(result.new_seq_lens[i])
        assert req.emitted == req.expected[:len(req.emitted)], f"request {req.rid}"
    return lens


def test_prefill_sets_the_first_cycle_window_and_the_pending_token(monkeypatch):
    worker, _, _ = make_worker(monkeypatch, "lockstep")
    requests = Requests(0)
    batch = requests.prefill_batch(3)
    published = []
    result = worker.forward_batch_generation(batch, on_publish=published.append)
    state = worker.state
    rows, lens = batch.req_pool_indices, batch.seq_lens
    assert torch.equal(state.pending[rows], torch.tensor([r.expected[0] for r in batch.reqs]))
    assert torch.equal(state.dense_start[rows], lens.int())  # drafts attend densely from L on
    k_sel = state.num_selected(lens.int())
    assert torch.equal(state.sel_lens[rows], k_sel) and bool((k_sel > 0).all())
    for b, row in enumerate(rows.tolist()):  # the K most recent prompt tokens
        n, end = int(k_sel[b]), int(lens[b])
        assert torch.equal(state.sel_indices[0, row, 0, :n], state.req_to_token[row, end - n:end])
    assert result.accept_lens.tolist() == [1, 1, 1] and result.next_token_ids.tolist() == state.pending[rows].tolist()
    assert len(published) == 1 and torch.equal(published[0], lens)
    _apply(result, batch, worker.k)


@pytest.mark.parametrize("k, score_norm", [(3, "exact"), (4, "draft")])
def test_lockstep_cycles_emit_the_target_sequence(monkeypatch, k, score_norm):
    worker, runner, target = make_worker(monkeypatch, "lockstep", k=k, score_norm=score_norm)
    assert list(worker.schedules) == ["lockstep"]
    requests = Requests(k)
    all_lens, published = [], []
    for step in range(60):
        requests.finish()
        if requests.rng.random() < 0.4 and requests.free:
            batch = requests.prefill_batch(requests.rng.randint(1, 3))
            _apply(worker.forward_batch_generation(batch), batch, k)
        if not requests.live:
            continue
        batch = requests.decode_batch()
        before = {name: getattr(batch, name) for name in BORROWED_FIELDS}
        prev_dense = worker.state.dense_start[batch.req_pool_indices].tolist()
        prev_sel = worker.state.sel_lens[batch.req_pool_indices].tolist()
        runner.forwards.clear()
        runner.draft_inputs.clear()
        result = worker.forward_batch_generation(batch, on_publish=published.append)
        # k draft forwards of the whole batch under the sparse-draft plan, then one verify.
        assert runner.forwards == [(PlanKind.SPARSE_DRAFT, len(batch.reqs))] * k
        assert target.verifies[-1] == len(batch.reqs)
        # The drafts read each request's committed state, gathered into batch order.
        assert runner.draft_inputs == [(prev_dense, prev_sel)] * k
        seq_before = batch.seq_lens.clone()
        all_lens += _apply(result, batch, k)
        # Committed: the verify window is the next dense tail, the last accepted token pending.
        assert torch.equal(worker.state.dense_start[batch.req_pool_indices], seq_before.int())
        last = [req.emitted[-1] for req in batch.reqs]
        assert worker.state.pending[batch.req_pool_indices].tolist() == last
        assert torch.equal(published[-1], result.new_seq_lens)
        # The step gave SGLang's batch back as it found it (the Schedule protocol).
        assert all(getattr(batch, name) is value for name, value in before.items()), [
            name for name, value in before.items() if getattr(batch, name) is not value]
    assert requests.next_id >= 10 and len(all_lens) > 150
    # Drafts were rejected at times (a 1-token step), and runs of several accepted tokens happened.
    assert min(all_lens) == 1 and max(all_lens) == k + 1
    summary = worker.schedule.profiler.summary()
    assert summary["cycles"] > 40
    assert all(summary[f"gpu_{p}_ms"] > 0 for p in ("draft", "verify", "accept"))


def test_unified_server_falls_back_to_lockstep_for_logprob_batches(monkeypatch):
    logprob_calls = []
    worker, runner, target = make_worker(monkeypatch, "unified", k=3)
    monkeypatch.setattr("sparsespec_sglang.lockstep.compute_spec_logprobs",
                        lambda batch, logits, predict, index: logprob_calls.append(index.shape[1]))
    assert list(worker.schedules) == ["lockstep", "unified"]
    assert worker.state.group_scores is not None  # the unified schedule's grouped top-K buffer
    unified = worker.schedules["unified"]
    requests = Requests(7)
    batch = requests.prefill_batch(5)
    _apply(worker.forward_batch_generation(batch), batch, 3)
    for step in range(12):
        logprobs = step % 4 == 3
        batch = requests.decode_batch(return_logprob=logprobs)
        runner.forwards.clear()
        n_verifies = len(target.verifies)
        result = worker.forward_batch_generation(batch)
        kinds = {kind for kind, _ in runner.forwards}
        if logprobs:
            assert kinds == {PlanKind.SPARSE_DRAFT} and len(target.verifies) == n_verifies + 1
            assert not unified.planner.offset  # the unified schedule forgot their drafts
        else:
            assert kinds == {PlanKind.UNIFIED_PASS} and len(target.verifies) == n_verifies
            assert set(unified.planner.offset) == {r.req_pool_idx for r in batch.reqs}
        _apply(result, batch, 3)
    assert logprob_calls == [4, 4, 4]  # accept_index rows of k + 1
    # The unified schedule's own phases are measured per step: the forwards took GPU time.
    summary = unified.profiler.summary()
    assert summary["gpu_forward_ms"] > 0 and summary["gpu_accept_ms"] > 0


def test_schedule_registry_matches_the_config_choices():
    from sparsespec_sglang.config import SCHEDULES as CONFIG_SCHEDULES

    assert CONFIG_SCHEDULES == tuple(SCHEDULES) and CONFIG_SCHEDULES[0] == "unified"  # the default
    for name, where in SCHEDULES.items():
        assert schedule_class(name).__name__ == where.split(":")[1]
    with pytest.raises(ValueError, match="--sparsespec-schedule.*allowed: unified, lockstep"):
        schedule_class("round-robin")
    assert schedule_class("lockstep").kv_reserve_per_decode(8) is None
    assert schedule_class("unified").kv_reserve_per_decode(8) == 27


def test_the_backend_reads_what_a_forward_is_from_its_batch():
    """The plan travels on the forward batch (``spec_info``), as SGLang's own algorithms' inputs
    do; the backend holds no mode: a DECODE forward without a plan is SGLang's, a TARGET_VERIFY
    forward is the PillarAttn verify."""
    backend = ToyBackend()
    step = DraftStep.allocate(4, torch.device("cpu"))
    draft = ForwardPlan.sparse_draft(step)
    unified = ForwardPlan.unified_pass(MixedRows.allocate(4, 8, torch.device("cpu")))

    def fb(mode, spec_info=None):
        return SimpleNamespace(forward_mode=mode, spec_info=spec_info)

    assert not backend._is_pillar_path(fb(ForwardMode.DECODE, draft))  # no state attached yet
    backend.attach(object())
    assert plan_of(fb(ForwardMode.DECODE, draft)) is draft
    assert plan_of(fb(ForwardMode.DECODE, unified)).kind is PlanKind.UNIFIED_PASS
    assert backend._is_pillar_path(fb(ForwardMode.DECODE, draft))
    assert backend._is_pillar_path(fb(ForwardMode.DECODE, unified))
    assert not backend._is_pillar_path(fb(ForwardMode.DECODE))  # plain decode: SGLang's Triton
    assert not backend._is_pillar_path(fb(ForwardMode.EXTEND))  # prefill: SGLang's Triton
    assert backend._is_pillar_path(fb(ForwardMode.TARGET_VERIFY, object()))  # SGLang's verify input
    assert plan_of(fb(ForwardMode.TARGET_VERIFY, object())) is None
    assert not hasattr(backend, "plan") and not hasattr(backend, "planned")
    # To SGLang's batch and graph code a plan is one token per row, and none of its own inputs.
    assert draft.num_tokens_per_req == 1 and not draft.is_draft_input() and not draft.is_verify_input()
