"""CUDA graphs of the single-token DECODE forwards: lockstep draft steps and unified passes.

SGLang's model runner captures decode graphs of one token width per speculative algorithm; for
SPARSESPEC (NGRAM-shaped) that is the k+1-token verify. A draft step or a unified pass is one token
per row, so each schedule captures a second runner over the same model runner,
:class:`SingleTokenGraphRunner`: SGLang's ``DecodeCudaGraphRunner`` built while the model runner
presents itself as a plain decoder (width 1, DECODE mode), whose capture batches carry the
schedule's :class:`~sparsespec_sglang.forward_plan.ForwardPlan` as their ``spec_info`` (SGLang's
``get_spec_info`` hook, the one its own algorithms use to give captured batches their inputs). The
captured attention is then the plan's PillarAttn path, which reads only graph-static buffers
(forward-batch inputs, the selection table, the plan's per-row buffers).
``tests/test_sglang_contract.py`` pins every ``spec_algorithm`` read of SGLang's runner, the reads
this presentation changes, and the ``spec_info`` path from capture to the backend.

A unified pass's graphs are keyed by the row count and captured for their own list of sizes (a
pass has up to ~2x as many rows as the batch has requests); every spare verify entry of a bucket
is an empty request (:meth:`~sparsespec_sglang.forward_plan.MixedRows.fill`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Optional, Sequence

import torch
from sparsespec_sglang.compat import (
    DecodeCudaGraphRunner,
    SpeculativeAlgorithm,
    envs,
    forward_context_of,
)

from sparsespec_sglang.forward_plan import ForwardPlan, PlanKind
from sparsespec_sglang.patches.graph_capture_sizes import capturing

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _as_plain_decoder(model_runner: Any) -> Iterator[None]:
    """Let SGLang's graph runner size and capture width-1 DECODE graphs."""
    saved = model_runner.spec_algorithm
    model_runner.spec_algorithm = SpeculativeAlgorithm.NONE
    try:
        yield
    finally:
        model_runner.spec_algorithm = saved


class SingleTokenGraphRunner(DecodeCudaGraphRunner):
    """SGLang's decode graph runner for single-token DECODE rows on a SPARSESPEC model runner.

    SGLang derives a runner's token width (``decode_num_tokens_per_req``) and capture mode from
    ``model_runner.spec_algorithm``: k + 1 tokens in TARGET_VERIFY for any speculative
    algorithm. Built (and its graphs captured) while the model runner reads as non-speculative,
    it captures width-1 DECODE graphs for ``capture_sizes`` row counts (None: the server's
    decode batch sizes, ``patches/graph_capture_sizes.py``), each with ``plan`` as the captured
    batch's ``spec_info`` (None: plain decode graphs, the unified schedule's all-dense passes)."""

    def __init__(self, model_runner: Any, plan: Optional[ForwardPlan],
                 capture_sizes: Optional[Sequence[int]] = None, attn_backend: Any = None) -> None:
        self.plan = plan  # read by get_spec_info while SGLang's constructor captures
        with _as_plain_decoder(model_runner), capturing(model_runner, capture_sizes):
            super().__init__(model_runner, attn_backend=attn_backend)
        if capture_sizes is not None and list(self.capture_bs) != sorted(set(capture_sizes)):
            raise RuntimeError("SPARSESPEC: graph sizes were not applied (is the plugin's "
                               "patches/graph_capture_sizes.py hook installed?)")

    def get_spec_info(self, num_tokens: int) -> Optional[ForwardPlan]:
        return self.plan


class ForwardGraphs:
    """How a schedule runs its plan's forwards: a replay of the smallest captured bucket a forward
    fits, else SGLang's eager model runner. Nothing is captured until :meth:`capture` (no CUDA
    graphs: every forward is eager).

    ``backend`` is the attention backend its graphs capture and replay with: the SPARSESPEC
    backend, or for plain decode graphs a second SGLang backend (``--sparsespec-dense-backend``).
    An eager forward always runs on the model runner's own backend (the SPARSESPEC backend, whose
    plan-less decode is SGLang's Triton decode): the same tokens, at that backend's speed."""

    def __init__(self, model_runner: Any, backend: Any, label: str) -> None:
        self.model_runner = model_runner
        self.backend = backend
        self.label = label
        self.runner: Optional[SingleTokenGraphRunner] = None
        self.captured = False
        self.sizes: list[int] = []
        self.replays = 0

    def capture(self, plan: Optional[ForwardPlan], capture_sizes: Optional[Sequence[int]] = None) -> None:
        """Graphs of ``plan``'s forwards (None: plain decode forwards, SGLang's own path)."""
        self.runner = SingleTokenGraphRunner(self.model_runner, plan, capture_sizes, attn_backend=self.backend)
        self.captured = True
        self.sizes = list(self.runner.capture_bs)
        logger.info("SPARSESPEC: captured %s CUDA graphs for %s", self.label, self.sizes)

    def bucket(self, num_rows: int) -> Optional[int]:
        """The captured size a forward of ``num_rows`` rows replays, or None (eager)."""
        return next((s for s in self.sizes if s >= num_rows), None)

    def run(self, forward_batch: Any) -> torch.Tensor:
        """Next-token logits of one forward whose plan is the batch's ``spec_info`` (None: a
        plain decode forward)."""
        plan: Optional[ForwardPlan] = forward_batch.spec_info
        bucket = self.bucket(forward_batch.input_ids.shape[0])
        # A unified pass replays a bucket only if the bucket has room for its verifies.
        rows = None if plan is None else plan.rows
        fits = bucket is not None and (rows is None or rows.num_verify <= bucket // rows.width)
        if fits and self.runner.can_run_graph(forward_batch):
            self.replays += 1
            # The context SGLang's model runner publishes around its own graph replays.
            with forward_context_of(self.backend, forward_batch):
                return self.runner.execute(forward_batch).next_token_logits
        if plan is not None and plan.kind is PlanKind.UNIFIED_PASS:
            # SGLang's eager runner copies a batch into buffers sized for max_running_requests;
            # a pass has up to ~2x as many rows, so it runs on the ForwardBatch's own tensors.
            with envs.SGLANG_EAGER_INPUT_NO_COPY.override(True):
                return self.model_runner.forward(forward_batch).logits_output.next_token_logits
        return self.model_runner.forward(forward_batch).logits_output.next_token_logits
