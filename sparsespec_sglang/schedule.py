"""How one decode step of a batch is laid out over forward passes: the schedule interface.

The worker (``worker.py``) is a thin SGLang adapter; the order of draft and verify forwards in a
decode step is a *schedule*. Two exist, each in its own module:

- ``lockstep`` (``lockstep.py``): k sparse draft forwards of the whole batch, then one verify
  forward of the whole batch (the deterministic default, and the fallback for batches that need
  per-token logprobs, a grammar or hidden states);
- ``unified`` (``unified.py``, the default): k + 1 passes that each mix drafting and verifying
  requests, so every pass carries a flat token count.

Both read and write per-request PillarAttn state only through
:class:`~sparsespec_sglang.pillar.PillarState`'s transitions, and tell the attention backend what
each forward is with the :class:`~sparsespec_sglang.forward_plan.ForwardPlan` its batch carries
(``spec_info``). A step borrows SGLang's batch for its forwards and gives every field back
(:func:`borrowed`). A new schedule is one module with a class that follows :class:`Schedule`,
plus one line in :data:`SCHEDULES`.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Optional, Protocol

if TYPE_CHECKING:  # annotations only: config.py reads SCHEDULES, and validation must not load torch
    import torch

# name -> "module:class"; imported on first use, so that config validation and the KV-reserve
# hook can name schedules without importing their modules.
SCHEDULES: dict[str, str] = {
    "unified": "sparsespec_sglang.unified:UnifiedSchedule",
    "lockstep": "sparsespec_sglang.lockstep:LockstepSchedule",
}


@dataclass
class StepResult:
    """One decode step of a batch, in SGLang's spec-v2 result shape (batch order)."""

    accept_tokens: torch.Tensor  # [B * (k + 1)] int32: request b's accepted tokens at [b * (k + 1):]
    accept_lens: torch.Tensor  # [B] int32, 1..k + 1 (the bonus token included)
    new_seq_lens: torch.Tensor  # [B] committed lengths after the step
    logits_output: Any  # the last verify forward's logits output (logprobs read it)
    can_run_cuda_graph: bool


@dataclass
class ScheduleContext:
    """What a schedule drives: the target model, the backend, the shared state."""

    k: int  # drafts per request between two verifies
    state: Any  # PillarState, the one owner of per-request PillarAttn state
    backend: Any  # SparseSpecAttnBackend
    model_runner: Any  # SGLang's target ModelRunner
    target_worker: Any  # SGLang's TpModelWorker (verify forwards of the lockstep schedule)
    sampling_backend: str  # --sampling-backend: which plain sampler the acceptance matches
    delayed_verification: bool  # unified: the host never waits on a verify result
    adaptive: bool = False  # unified: each request speculates or decodes densely, chosen per step
    # The SGLang attention backend of all-dense passes (--sparsespec-dense-backend); None: ``backend``
    dense_backend: Any = None
    # This rank's tensor-parallel group where it has several ranks (None: one rank)
    tp_group: Optional["TPGroup"] = None


@dataclass
class TPGroup:
    """A tensor-parallel group's ranks run each pass as one collective forward, so a choice that
    shapes the passes (adaptive speculation's modes) must be the same on every rank: the group's
    first rank makes it, from its own measurements, and the others receive it."""

    cpu_group: Any  # the group's CPU (gloo) process group, as SGLang's scheduler broadcasts on
    first_rank: int  # the global rank that chooses
    rank: int  # this rank's global rank

    @property
    def chooses(self) -> bool:
        return self.rank == self.first_rank

    def agree(self, flags: Optional[list[bool]], n: int) -> list[bool]:
        """The first rank's ``n`` flags on every rank (others pass None). Every rank must call
        it at the same point of the same step."""
        import torch
        import torch.distributed as dist

        if self.chooses:
            if flags is None or len(flags) != n:
                raise ValueError(f"TPGroup.agree: the first rank must give {n} flags")
            values = torch.tensor(flags, dtype=torch.uint8)
        else:
            values = torch.empty((n,), dtype=torch.uint8)
        dist.broadcast(values, src=self.first_rank, group=self.cpu_group)
        return values.bool().tolist()


class Schedule(Protocol):
    """One decode step of a batch as draft and verify forwards on the target model."""

    PHASES: ClassVar[tuple[str, ...]]  # the phases its profiler times
    VALUES: ClassVar[tuple[str, ...]]  # per-step values its profiler exports beside them

    @classmethod
    def kv_reserve_per_decode(cls, k: int) -> Optional[int]:
        """KV positions SGLang must reserve past a request's committed length before each decode
        step (patches/kv_reserve.py), or None when SGLang's own spec-v2 reserve suffices."""

    @classmethod
    def group_scores(cls, k: int, num_rows: int) -> Optional[tuple[int, int]]:
        """(layers, verifying requests) whose verify scores PillarState keeps for one grouped
        top-K launch, or None; asked before PillarState is built, so all of it is allocated at once."""

    def handles(self, batch: Any) -> bool:
        """Whether this schedule can run the batch (the worker falls back to lockstep if not)."""

    def step(self, batch: Any, rows: list[int]) -> StepResult:
        """Draft and verify every request of a decode batch once (``rows``: their request-pool
        rows, in batch order); gives the batch's fields back as it found them (:func:`borrowed`)."""

    def forget(self, pool_rows: list[int]) -> None:
        """These request-pool rows start over (prefilled, or stepped by another schedule): drop
        whatever this schedule carries for them across steps."""

    def capture_graphs(self, max_batch_size: int) -> None:
        """Capture this schedule's CUDA graphs (after SGLang captured the verify graphs)."""


# The ScheduleBatch fields a step's forwards set (ForwardBatch.init_new reads them).
BORROWED_FIELDS = ("forward_mode", "input_ids", "out_cache_loc", "seq_lens", "seq_lens_cpu",
                   "seq_lens_sum", "spec_info", "return_logprob", "req_pool_indices")


@contextlib.contextmanager
def borrowed(batch: Any) -> Iterator[dict[str, Any]]:
    """A step's use of SGLang's batch: yields its original fields and restores every one of them
    afterwards, whatever the step's forwards set, so SGLang finds the batch it scheduled (the
    worker's result carries what changed: tokens, lengths)."""
    saved = {name: getattr(batch, name) for name in BORROWED_FIELDS}
    try:
        yield saved
    finally:
        for name, value in saved.items():
            setattr(batch, name, value)


def schedule_class(name: str) -> type:
    """The class registered under ``name`` (``--sparsespec-schedule``)."""
    if name not in SCHEDULES:
        raise ValueError(f"--sparsespec-schedule: unknown schedule {name!r}; allowed: "
                         f"{', '.join(SCHEDULES)}")
    module, cls = SCHEDULES[name].split(":")
    return getattr(importlib.import_module(module), cls)
