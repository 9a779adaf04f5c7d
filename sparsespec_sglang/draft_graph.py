"""CUDA graphs for the sparse draft steps.

SGLang 0.5.17's model runner captures decode graphs of one token width per
speculative algorithm; for SPARSESPEC (NGRAM-shaped) that is the k+1-token
verify. A draft step is one token per request, so the worker captures a second
``DecodeCudaGraphRunner`` over the same model runner, built while the runner
presents itself as a plain decoder (width 1, DECODE mode) and with the
attention backend in sparse-draft mode: the captured attention is the PillarAttn
sparse decode kernel, which reads only graph-static buffers (forward-batch
inputs, the selection table, and the per-request draft buffers of
:class:`~sparsespec_sglang.pillar.PillarState`).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from sglang.srt.model_executor.forward_context import ForwardContext, forward_context
from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

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


class DraftGraphs:
    """Captured width-1 decode graphs; ``run`` falls back to eager when a batch does not fit."""

    def __init__(self, model_runner: Any, backend: Any, step: Any) -> None:
        self.model_runner = model_runner
        self.backend = backend
        with _as_plain_decoder(model_runner), backend.draft_step(step):
            self.runner = DecodeCudaGraphRunner(model_runner)
        logger.info("SPARSESPEC: captured draft CUDA graphs for batch sizes %s",
                    self.runner.capture_bs)

    def run(self, forward_batch: Any) -> torch.Tensor:
        """Next-token logits of one draft step (the backend is already in draft mode)."""
        if self.runner.can_run_graph(forward_batch):
            with forward_context(ForwardContext(attn_backend=self.backend)):
                return self.runner.execute(forward_batch).next_token_logits
        return self.model_runner.forward(forward_batch).logits_output.next_token_logits
