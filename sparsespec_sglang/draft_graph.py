"""CUDA graphs for the sparse draft steps and the unified passes.

SGLang's model runner captures decode graphs of one token width per
speculative algorithm; for SPARSESPEC (NGRAM-shaped) that is the k+1-token
verify. A draft step is one token per request, so the worker captures a second
runner over the same model runner, :class:`SingleTokenGraphRunner`: SGLang's
``DecodeCudaGraphRunner`` built while the model runner presents itself as a plain
decoder (width 1, DECODE mode) and with the attention backend in sparse-draft mode: the
captured attention is the PillarAttn sparse decode kernel, which reads only graph-static
buffers (forward-batch inputs, the selection table, and the per-request draft buffers of
:class:`~sparsespec_sglang.pillar.PillarState`). ``tests/test_sglang_contract.py`` pins every
``spec_algorithm`` read of SGLang's runner, the reads this presentation changes.

A unified pass (``unified.py``) is the same kind of forward (single-token rows) with the backend
in mixed mode; its graphs are keyed by the row count and captured for their own list of sizes
(a pass has up to ~2x as many rows as the batch has requests), with every spare verify entry of
a bucket an empty request (:meth:`~sparsespec_sglang.pillar.MixedRows.pad_for_graph`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, ContextManager, Iterator, Optional, Sequence

import torch
from sparsespec_sglang.compat import (
    DecodeCudaGraphRunner,
    ForwardMode,
    SpeculativeAlgorithm,
    forward_context_of,
)

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


BORROWED_FIELDS = ("forward_mode", "input_ids", "out_cache_loc", "seq_lens", "seq_lens_cpu",
                   "seq_lens_sum", "spec_info", "return_logprob", "req_pool_indices")


@contextlib.contextmanager
def as_decode_rows(batch: Any) -> Iterator[dict[str, Any]]:
    """Borrow the scheduler's batch for single-token-row DECODE forwards (draft steps, unified
    passes): yields its original fields, restores them afterwards whatever the forwards set."""
    saved = {name: getattr(batch, name) for name in BORROWED_FIELDS}
    batch.forward_mode = ForwardMode.DECODE
    batch.spec_info = None
    batch.return_logprob = False
    try:
        yield saved
    finally:
        for name, value in saved.items():
            setattr(batch, name, value)


class SingleTokenGraphRunner(DecodeCudaGraphRunner):
    """SGLang's decode graph runner for single-token DECODE rows on a SPARSESPEC model runner.

    SGLang derives a runner's token width (``decode_num_tokens_per_req``) and capture mode from
    ``model_runner.spec_algorithm``: k + 1 tokens in TARGET_VERIFY for any speculative
    algorithm. Built (and its graphs captured) while the model runner reads as non-speculative,
    it captures width-1 DECODE graphs for ``capture_sizes`` row counts (None: the server's
    decode batch sizes, ``patches/graph_capture_sizes.py``)."""

    def __init__(self, model_runner: Any, capture_sizes: Optional[Sequence[int]] = None) -> None:
        with _as_plain_decoder(model_runner), capturing(model_runner, capture_sizes):
            super().__init__(model_runner)
        if capture_sizes is not None and list(self.capture_bs) != sorted(set(capture_sizes)):
            raise RuntimeError("SPARSESPEC: graph sizes were not applied (is the plugin's "
                               "patches/graph_capture_sizes.py hook installed?)")


class DraftGraphs:
    """Captured width-1 decode graphs; ``run`` falls back to eager when a batch does not fit.

    ``mode`` enters the backend mode the graphs capture (draft step or unified pass)."""

    def __init__(self, model_runner: Any, backend: Any, mode: Callable[[], ContextManager],
                 capture_sizes: Optional[Sequence[int]] = None, label: str = "draft") -> None:
        self.model_runner = model_runner
        self.backend = backend
        with mode():
            self.runner = SingleTokenGraphRunner(model_runner, capture_sizes)
        self.sizes = list(self.runner.capture_bs)
        logger.info("SPARSESPEC: captured %s CUDA graphs for %s", label, self.sizes)

    def bucket(self, num_rows: int) -> Optional[int]:
        """The captured size a forward of ``num_rows`` rows replays, or None (eager)."""
        return next((s for s in self.sizes if s >= num_rows), None)

    def run(self, forward_batch: Any) -> torch.Tensor:
        """Next-token logits of one forward (the backend is already in the captured mode)."""
        if self.runner.can_run_graph(forward_batch):
            # The context SGLang's model runner publishes around its own graph replays.
            with forward_context_of(self.backend, forward_batch):
                return self.runner.execute(forward_batch).next_token_logits
        return self.model_runner.forward(forward_batch).logits_output.next_token_logits
