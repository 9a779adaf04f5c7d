"""Several GPUs, the parts a CPU can check (issue 33).

Tensor parallelism: every rank of a TP group runs its own SparseSpecWorker over its shard of the
heads (SGLang splits num_kv_heads and num_attention_heads over the ranks; its KV pool is sized with
``ModelConfig.get_num_kv_heads(attn_tp_size)``). The worker is built here as rank r of TP 1, 2 and
4 would build it, for a model of 8 KV heads and 32 query heads: the selection tables and score
buffers must have 8 / tp KV heads, the draft-lse ring 32 / tp query heads, and the memory figure
PillarState logs must be that rank's. K depends only on the context length, so every rank selects
the same number of tokens for a request; the top-K selection is per KV head, so a rank's selection
is its heads' part of the unsharded one.

Data parallelism (``--dp-size N`` without DP attention): SGLang's DataParallelController starts, per
replica, its own scheduler processes through the same ``run_scheduler_process`` that a single
server uses (it loads the plugins, then builds the Scheduler, which builds the worker), each
replica with its own PortArgs (NCCL port) and GPUs. Nothing of SPARSESPEC is shared between
processes, so every replica holds its own worker and PillarState.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import threading
import types
from types import SimpleNamespace

import pytest
import torch

from sparsespec_sglang import compat
from sparsespec_sglang.config import SparseSpecConfig
from sparsespec_sglang.pillar import PillarState
from sparsespec_sglang.selection import SelectionPolicy
from test_lockstep import patch_worker_runtime, sglang_runtime
from toy_model import ToyBackend, ToyModelRunner, ToyTargetWorker, sparsespec_record

TOTAL_Q_HEADS, TOTAL_KV_HEADS, LAYERS = 32, 8, 3
NUM_ROWS, MAX_CTX, K_DRAFT = 8, 512, 3
CONFIG = {"sparsespec_min_selected": 4, "sparsespec_max_selected": 32}


def model_config() -> SimpleNamespace:
    """A model of 32 query and 8 KV heads whose per-rank head counts are SGLang's own
    ``ModelConfig`` methods."""
    from sglang.srt.configs.model_config import ModelConfig

    mc = SimpleNamespace(num_hidden_layers=LAYERS, num_attention_heads=TOTAL_Q_HEADS,
                         get_total_num_kv_heads=lambda: TOTAL_KV_HEADS,
                         is_draft_model=False)  # read by get_num_kv_heads from 0.5.23
    mc.get_num_attention_heads = types.MethodType(ModelConfig.get_num_attention_heads, mc)
    mc.get_num_kv_heads = types.MethodType(ModelConfig.get_num_kv_heads, mc)
    return mc


def rank_worker(monkeypatch, tp_rank: int, tp_size: int, schedule: str = "unified",
                score_norm: str = "draft"):
    """The worker of rank ``tp_rank`` of a TP group of ``tp_size``, built as SGLang's scheduler
    builds it, over a KV pool of that rank's KV heads."""
    from sparsespec_sglang.worker import SparseSpecWorker

    patch_worker_runtime(monkeypatch)
    req_to_token = torch.arange(NUM_ROWS * MAX_CTX, dtype=torch.int32).view(NUM_ROWS, MAX_CTX)
    backend = ToyBackend()
    runner = ToyModelRunner(backend)
    runner.model_config = model_config()
    # What SGLang's KV-cache configurator passes as the pool's head_num on this rank.
    runner.token_to_kv_pool = SimpleNamespace(head_num=runner.model_config.get_num_kv_heads(tp_size))
    runner.attn_backend = backend
    runner.decode_cuda_graph_runner = None
    target = ToyTargetWorker(runner, req_to_token)
    server_args = sparsespec_record(K_DRAFT, {"sparsespec_schedule": schedule, "sparsespec_score_norm": score_norm,
                                              **CONFIG})
    with sglang_runtime(tp_rank=tp_rank, tp_size=tp_size):
        worker = SparseSpecWorker(server_args=server_args, gpu_id=tp_rank, nccl_port=0, target_worker=target)
        pool, allocator = target.get_memory_pool()
        worker.alloc_memory_pool(memory_pool_config=None, req_to_token_pool=pool,
                                 token_to_kv_pool_allocator=allocator)
        worker.init_attention_backends()
    return worker


def expected_nbytes(state: PillarState, kv_heads: int, q_heads: int) -> int:
    """PillarState's buffers, by hand: int32 selection tables and per-row ints, int64 pending,
    fp32 scores (one layer, and the grouped buffer) and draft-lse ring."""
    sel = LAYERS * NUM_ROWS * kv_heads * state.max_sel * 4
    per_row = NUM_ROWS * (4 * 3 + 8)  # sel_lens, sel_recent, dense_start; pending
    scores = NUM_ROWS * kv_heads * MAX_CTX * 4
    group = 0 if state.group_scores is None else (
        state.group_scores.shape[0] * state.group_scores.shape[1] * kv_heads * MAX_CTX * 4)
    ring = 0 if state.draft_lse is None else LAYERS * NUM_ROWS * q_heads * (K_DRAFT + 1) * 4
    return sel + per_row + scores + group + ring


@pytest.mark.parametrize("schedule", ["unified", "lockstep"])
@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_each_rank_sizes_its_state_from_its_own_heads(monkeypatch, caplog, tp_size, schedule):
    kv_heads, q_heads = TOTAL_KV_HEADS // tp_size, TOTAL_Q_HEADS // tp_size
    figures = set()
    for tp_rank in range(tp_size):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="sparsespec_sglang.pillar"):
            worker = rank_worker(monkeypatch, tp_rank, tp_size, schedule=schedule)
        state = worker.state
        assert worker.backend.state is state
        assert state.sel_indices.shape == (LAYERS, NUM_ROWS, kv_heads, state.max_sel)
        assert state.scores.shape == (NUM_ROWS, kv_heads, MAX_CTX)
        assert state.draft_lse.shape == (LAYERS, NUM_ROWS, q_heads, K_DRAFT + 1)
        if schedule == "unified":
            assert state.group_scores is not None and state.group_scores.shape[2:] == (kv_heads, MAX_CTX)
        else:
            assert state.group_scores is None
        assert state.nbytes == expected_nbytes(state, kv_heads, q_heads)
        (line,) = [r.getMessage() for r in caplog.records if "SPARSESPEC state" in r.getMessage()]
        assert f"x {kv_heads} KV heads x" in line
        assert f"{state.nbytes / 2**20:.1f} MiB of GPU memory" in line
        figures.add(state.nbytes)
    assert len(figures) == 1  # every rank of the group holds the same


def test_a_ranks_memory_figure_shrinks_with_its_shard(monkeypatch):
    """Head-sized buffers (selection tables, scores, ring) split over the ranks; per-row ints do not."""
    full = rank_worker(monkeypatch, 0, 1).state
    for tp_size in (2, 4):
        shard = rank_worker(monkeypatch, 0, tp_size).state
        per_row = NUM_ROWS * (4 * 3 + 8)  # sel_lens, sel_recent, dense_start (int32), pending (int64)
        assert (shard.nbytes - per_row) * tp_size == full.nbytes - per_row


def test_query_heads_are_divided_by_the_attention_tp_size(monkeypatch):
    """The ring's query heads are split as SGLang's attention layers and KV pool split theirs
    (``attn_tp_size``), not by the whole TP world."""
    from sglang.srt.runtime_context import get_parallel

    from sparsespec_sglang.compat import get_parallel as compat_get_parallel

    asked = []
    worker = rank_worker(monkeypatch, 0, 2)
    mc = worker.model_runner.model_config
    real = mc.get_num_attention_heads
    mc.get_num_attention_heads = lambda tp: asked.append(tp) or real(tp)
    with get_parallel().override(tp_rank=0, tp_size=4, attn_tp_size=2, moe_tp_size=4):
        assert compat_get_parallel().attn_tp_size == 2
        worker.alloc_memory_pool(memory_pool_config=None, req_to_token_pool=None,
                                 token_to_kv_pool_allocator=None)
    assert asked == [2]
    assert worker.state.draft_lse.shape[2] == TOTAL_Q_HEADS // 2


def _config() -> SparseSpecConfig:
    return SparseSpecConfig.from_values(K_DRAFT, {k: v for k, v in CONFIG.items()})


def test_every_rank_selects_the_same_k_and_its_heads_part_of_the_selection():
    """The first-cycle window and the verify's top-K on a rank of TP 2 / 4 (its KV heads' scores)
    are that rank's heads of the unsharded selection, with the same K per request on every rank."""
    from sparsespec_sglang.kernels.topk_select import select_topk

    config = _config()
    req_to_token = torch.arange(NUM_ROWS * MAX_CTX, dtype=torch.int32).view(NUM_ROWS, MAX_CTX).flip(1).contiguous()
    rows = torch.tensor([5, 2, 7], dtype=torch.int32)
    prompt = torch.tensor([40, 300, 9], dtype=torch.int32)
    prefix = torch.tensor([60, 401, 25], dtype=torch.int32)  # committed length before a verify
    width = K_DRAFT + 1
    torch.manual_seed(0)
    full_scores = torch.rand(len(rows), TOTAL_KV_HEADS, MAX_CTX)

    def run(num_kv_heads: int, head_slice: slice) -> PillarState:
        state = PillarState(config, LAYERS, TOTAL_Q_HEADS * num_kv_heads // TOTAL_KV_HEADS,
                            num_kv_heads, req_to_token)
        state.init_window(rows, prompt)
        window = state.sel_indices.clone(), state.sel_lens.clone()
        select_topk(full_scores[:, head_slice].contiguous(), SelectionPolicy.of(config, state.max_sel),
                    req_to_token=req_to_token, req_pool_indices=rows, seq_lens=prefix + width,
                    cand_end=prefix, out_indices=state.sel_indices[0], out_lens=state.sel_lens,
                    out_recent=state.sel_recent)
        return state, window

    full, full_window = run(TOTAL_KV_HEADS, slice(None))
    expected_k = SelectionPolicy.of(config, full.max_sel).num_selected_tensor(prefix + width, cand_end=prefix)
    assert full.sel_lens[rows.long()].tolist() == expected_k.tolist()
    for tp_size in (2, 4):
        per_rank = TOTAL_KV_HEADS // tp_size
        for tp_rank in range(tp_size):
            heads = slice(tp_rank * per_rank, (tp_rank + 1) * per_rank)
            shard, window = run(per_rank, heads)
            assert torch.equal(window[1], full_window[1])  # first-cycle K
            assert torch.equal(window[0], full_window[0][:, :, heads])
            assert torch.equal(shard.sel_lens, full.sel_lens)  # verify K: the same on every rank
            assert torch.equal(shard.sel_recent, full.sel_recent)
            for row, k in zip(rows.long().tolist(), expected_k.tolist()):
                assert torch.equal(shard.sel_indices[0, row, :, :k], full.sel_indices[0, row, heads, :k])


# ---- data parallelism (--dp-size N without DP attention) ------------------------------------


def _server_args(**overrides) -> SimpleNamespace:
    """ServerArgs' defaults as a plain record, with ``overrides``."""
    from sglang.srt.server_args import ServerArgs

    values = {f.name: f.default for f in dataclasses.fields(ServerArgs)
              if f.default is not dataclasses.MISSING}
    values.update(is_ep_scale_joiner=False, **overrides)
    return SimpleNamespace(**values)


# The DP launch path these tests read (engine -> DataParallelController -> launch_tensor_parallel_group)
# is 0.5.17's; 0.5.23 launches schedulers from Engine._launch_scheduler_processes and builds its server
# arguments differently. Pinning the 0.5.23 form is still to do.
DP_PATH_OF_0517 = pytest.mark.skipif(compat.since("0.5.23"), reason="pins 0.5.17's DP launch path")


@DP_PATH_OF_0517
def test_the_engine_hands_dp_replicas_the_single_server_scheduler_entry():
    """With --dp-size > 1 the engine starts the DataParallelController with the same
    ``run_scheduler_process`` it runs per TP rank otherwise (which loads the plugins first)."""
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.managers import scheduler

    launch = inspect.getsource(Engine._launch_scheduler_processes)
    assert "server_args.dp_size > 1" in launch
    assert "target=run_data_parallel_controller_process" in launch
    assert "run_scheduler_process_func=run_scheduler_process_func" in launch
    entry = inspect.getsource(scheduler.run_scheduler_process)
    assert entry.index("load_plugins()") < entry.index("Scheduler(")


@DP_PATH_OF_0517
def test_each_dp_replica_gets_its_own_scheduler_processes_ports_and_gpus(monkeypatch):
    """DataParallelController without DP attention: per replica a fresh PortArgs (its own NCCL
    port, so its own TP group) and tp_size scheduler processes of ``run_scheduler_process``,
    on that replica's GPUs, with tp_rank 0..tp_size-1 (the ranks the worker and PillarState
    are built for, as in a single server)."""
    import contextlib

    from sglang.srt.managers import data_parallel_controller as dpc

    started, ports = [], iter(range(30000, 30100))

    class Process:
        def __init__(self, target, args):
            self.target, self.args = target, args

        def start(self):
            started.append(self)

    class Reader:
        def recv(self):
            return {"max_total_num_tokens": 1, "max_req_input_len": 1}

    monkeypatch.setattr(dpc.mp, "Process", Process)
    monkeypatch.setattr(dpc.mp, "Pipe", lambda duplex: (Reader(), None))
    monkeypatch.setattr(dpc, "maybe_reindex_device_id", contextlib.contextmanager(lambda gpu: (yield gpu)))
    monkeypatch.setattr(dpc.numa_utils, "configure_subprocess", lambda *a: contextlib.nullcontext())
    monkeypatch.setattr(dpc, "aggregate_scheduler_startup_times", lambda infos: list(infos))
    monkeypatch.setattr(dpc.PortArgs, "init_new",
                        classmethod(lambda cls, *a, **k: SimpleNamespace(nccl_port=next(ports))))
    # The replicas' launch (launch_dp_schedulers runs this per replica, in a thread that then
    # sleeps forever; its loop is checked below by source).
    server_args = _server_args(tp_size=2, dp_size=2, enable_dp_attention=False)
    ctrl = dpc.DataParallelController.__new__(dpc.DataParallelController)
    ctrl.run_scheduler_process_func = dpc.run_scheduler_process
    ctrl.env_lock, ctrl.scheduler_procs = threading.Lock(), []
    replica_ports = []
    for dp_rank in range(server_args.dp_size):
        port_args = dpc.PortArgs.init_new(server_args)
        replica_ports.append(port_args.nccl_port)
        ctrl.launch_tensor_parallel_group(server_args, port_args, base_gpu_id=dp_rank * server_args.tp_size,
                                          dp_rank=dp_rank)
    assert len(set(replica_ports)) == 2
    assert all(p.target is dpc.run_scheduler_process for p in started)
    params = list(inspect.signature(dpc.run_scheduler_process).parameters)
    got = [{name: p.args[params.index(name)] for name in ("gpu_id", "tp_rank", "dp_rank")}
           | {"nccl_port": p.args[params.index("port_args")].nccl_port} for p in started]
    assert got == [
        {"gpu_id": 0, "tp_rank": 0, "dp_rank": 0, "nccl_port": replica_ports[0]},
        {"gpu_id": 1, "tp_rank": 1, "dp_rank": 0, "nccl_port": replica_ports[0]},
        {"gpu_id": 2, "tp_rank": 0, "dp_rank": 1, "nccl_port": replica_ports[1]},
        {"gpu_id": 3, "tp_rank": 1, "dp_rank": 1, "nccl_port": replica_ports[1]},
    ]
    replicas = inspect.getsource(dpc.DataParallelController.launch_dp_schedulers)
    assert "for dp_rank in range(server_args.dp_size)" in replicas
    assert "PortArgs.init_new(server_args)" in replicas
    assert "server_args.tp_size * server_args.pp_size * server_args.gpu_id_step" in replicas
    init = inspect.getsource(dpc.DataParallelController.__init__)
    assert "self.launch_dp_schedulers(server_args, port_args)" in init


@DP_PATH_OF_0517
def test_dp_size_passes_the_sparsespec_checks(monkeypatch):
    """--dp-size N (replicas) is accepted; only DP attention is refused."""
    from sparsespec_sglang import validation
    from sparsespec_sglang.config import SparseSpecArgsError

    monkeypatch.setattr("sparsespec_sglang.compat.resolving", lambda sa: sa)
    monkeypatch.setattr("sparsespec_sglang.compat.attention_backends_of", lambda cfg: ["sparsespec"])
    monkeypatch.setattr("sparsespec_sglang.compat.model_config_of", lambda sa: SimpleNamespace(
        hf_config=SimpleNamespace(architectures=["Qwen3ForCausalLM"])))
    server_args = _server_args(speculative_algorithm="SPARSESPEC", tp_size=2, dp_size=2, device="cuda",
                               enable_dp_attention=False, max_running_requests=None)
    validation.validate_server_args(server_args)
    assert server_args.speculative_num_draft_tokens == server_args.speculative_num_steps + 1
    monkeypatch.setattr("sparsespec_sglang.compat.dp_attention",
                        lambda cfg: ("--enable-dp-attention", "off", True))
    with pytest.raises(SparseSpecArgsError, match="DP attention is not supported"):
        validation.validate_server_args(server_args)


def _agree_on_rank(rank: int, port: int, flags: list, out) -> None:
    import torch.distributed as dist

    from sparsespec_sglang.schedule import TPGroup

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = TPGroup(dist.new_group([0, 1], backend="gloo"), first_rank=0, rank=rank)
        got = [group.agree(flags if group.chooses else None, len(flags)) for _ in range(3)]
        out.put((rank, got))
    finally:
        dist.destroy_process_group()


def test_a_tp_groups_ranks_agree_on_the_first_ranks_flags():
    """TPGroup.agree over a real two-process gloo group (SGLang's TP CPU group is one): every rank
    returns the first rank's flags, call after call."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    flags = [True, False, False, True, True]
    procs = [ctx.Process(target=_agree_on_rank, args=(r, port, flags if r == 0 else [False] * 5, out))
             for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == {0: [flags] * 3, 1: [flags] * 3}
