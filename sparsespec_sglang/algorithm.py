"""SPARSESPEC as SGLang's scheduler sees it: the spec class and the two factories it registers."""

from __future__ import annotations

from typing import Any

import torch

from sparsespec_sglang import compat
from sparsespec_sglang.compat import CustomSpecAlgo
from sparsespec_sglang.config import ALGORITHM_NAME, SparseSpecArgsError, allowed_device


class SparseSpecAlgo(CustomSpecAlgo):
    """SPARSESPEC as SGLang's scheduler sees it.

    To the scheduler a SPARSESPEC step is NGRAM-shaped: no draft model, a chain
    of k+1 tokens verified through ``NgramVerifyInput`` in TARGET_VERIFY mode,
    and the draft state relayed through ``batch.spec_info`` rather than the
    EAGLE FutureMap buffers; ``is_ngram()`` routes it through those branches
    (verify CUDA graphs, relay, KV sizing). ``tests/test_sglang_contract.py`` lists every
    ``is_ngram()`` call site of each supported SGLang release with what SPARSESPEC needs there
    and fails when the list changes; the one NGRAM branch SPARSESPEC must not take (the
    external corpus manager) is undone by ``patches/corpus_manager.py``. Drafts write KV only
    into the verify slots of the same step, hence ``has_draft_kv() is False``.

    ``CustomSpecAlgo`` also lacks methods of the enum interface SGLang calls algorithms through:
    ``create_future_map``, ``need_topk`` and ``carries_draft_hidden_states`` (the scheduler calls
    them on every speculative algorithm) and ``get_platform_worker_cls`` (from 0.5.23; SGLang asks
    it of EAGLE only today); they are provided here.
    """

    def is_ngram(self) -> bool:
        return True

    def has_draft_kv(self) -> bool:
        return False

    def need_topk(self) -> bool:
        return False

    def carries_draft_hidden_states(self) -> bool:
        return False

    def get_platform_worker_cls(self) -> None:
        return None  # no platform replaces the worker: the registered factory builds it

    def create_future_map(self, device: torch.device, req_to_token_pool: Any,
                          needs_cpu_seq_lens: bool = True, needs_confidence_relay: bool = False) -> Any:
        return compat.FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)


def worker_factory(server_args: Any) -> type:
    """Called by the scheduler, where the resolved device is SGLang's runtime context (the record's
    ``device`` keeps the raw input, None for auto-detection, from 0.5.19 on)."""
    device = compat.get_device().device
    if not allowed_device(device):
        raise SparseSpecArgsError(f"{ALGORITHM_NAME}: runs on CUDA GPUs only (--device {device})")
    from sparsespec_sglang.worker import SparseSpecWorker

    return SparseSpecWorker


def create_attention_backend(runner: Any) -> Any:
    from sparsespec_sglang.attention import create_backend

    return create_backend(runner)
