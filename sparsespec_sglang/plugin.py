"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang's ``load_plugins()`` calls :func:`register` once per process (launcher,
Engine, scheduler, detokenizer); it registers the SPARSESPEC algorithm, the
``sparsespec`` attention backend and the hooks under ``patches/``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
from sglang.srt.speculative.spec_registry import CustomSpecAlgo, get_spec

from sparsespec_sglang.config import ALGORITHM_NAME, ATTENTION_BACKEND_NAME, SparseSpecArgsError
from sparsespec_sglang.validation import validate_server_args

logger = logging.getLogger(__name__)


class SparseSpecAlgo(CustomSpecAlgo):
    """SPARSESPEC as SGLang's scheduler sees it.

    To the scheduler a SPARSESPEC step is NGRAM-shaped: no draft model, a chain
    of k+1 tokens verified through ``NgramVerifyInput`` in TARGET_VERIFY mode,
    and the draft state relayed through ``batch.spec_info`` rather than the
    EAGLE FutureMap buffers; ``is_ngram()`` routes it through those branches
    (verify CUDA graphs, relay, KV sizing). ``tests/test_sglang_contract.py`` lists every
    ``is_ngram()`` call site of SGLang 0.5.17 with what SPARSESPEC needs there and fails when
    the list changes; the one NGRAM branch SPARSESPEC must not take (the external corpus
    manager) is undone by ``patches/corpus_manager.py``. Drafts write KV only into the verify
    slots of the same step, hence ``has_draft_kv() is False``.

    ``CustomSpecAlgo`` also lacks three methods the 0.5.17 scheduler calls on
    every speculative algorithm (``create_future_map``, ``need_topk``,
    ``carries_draft_hidden_states``); they are provided here.
    """

    def is_ngram(self) -> bool:
        return True

    def has_draft_kv(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def carries_draft_hidden_states(self) -> bool:
        return False

    def create_future_map(self, device: torch.device, req_to_token_pool: Any,
                          needs_cpu_seq_lens: bool = True, needs_confidence_relay: bool = False) -> Any:
        from sglang.srt.managers.overlap_utils import FutureMap

        return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)


def _worker_factory(server_args: Any) -> type:
    if server_args.device != "cuda":
        raise SparseSpecArgsError(
            f"{ALGORITHM_NAME}: runs on CUDA GPUs only (--device {server_args.device})"
        )
    from sparsespec_sglang.worker import SparseSpecWorker

    return SparseSpecWorker


def _create_attention_backend(runner: Any) -> Any:
    from sparsespec_sglang.attention import create_backend

    return create_backend(runner)


def register() -> None:
    """Entry point: idempotent, so tests and repeated ``load_plugins()`` are safe."""
    if get_spec(ALGORITHM_NAME) is None:
        SpeculativeAlgorithm.register(
            ALGORITHM_NAME,
            supports_overlap=True,
            validate_server_args=validate_server_args,
            spec_class=SparseSpecAlgo,
        )(_worker_factory)

    from sglang.srt.layers.attention.attention_registry import (
        ATTENTION_BACKENDS,
        register_attention_backend,
    )
    from sglang.srt.server_args import (
        ATTENTION_BACKEND_CHOICES,
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )

    if ATTENTION_BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(ATTENTION_BACKEND_NAME)(_create_attention_backend)
    if ATTENTION_BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND_NAME])
    if ATTENTION_BACKEND_NAME not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        # Its verify runs SGLang's deterministic decode kernel per token under
        # --enable-deterministic-inference (sparsespec_sglang/deterministic.py).
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES.append(ATTENTION_BACKEND_NAME)

    from sparsespec_sglang.patches import corpus_manager as corpus_manager_patch
    from sparsespec_sglang.patches import graph_capture_sizes as graph_capture_sizes_patch
    from sparsespec_sglang.patches import hicache_io as hicache_io_patch
    from sparsespec_sglang.patches import kv_reserve as kv_reserve_patch
    from sparsespec_sglang.patches import retraction as retraction_patch
    from sparsespec_sglang.patches import server_args as server_args_patch

    server_args_patch.register()
    retraction_patch.register()
    kv_reserve_patch.register()
    hicache_io_patch.register()
    corpus_manager_patch.register()
    graph_capture_sizes_patch.register()
    logger.info("sparsespec-sglang: registered %s", ALGORITHM_NAME)
