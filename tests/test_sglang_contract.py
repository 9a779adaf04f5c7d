"""The SGLang 0.5.17 internals the worker, backend and draft graphs call, checked on CPU.

The end-to-end path only runs on a GPU host; these checks fail in CI as soon as an SGLang
upgrade renames a parameter the plugin passes, instead of at the first request on a server.
"""

import dataclasses
import inspect

import pytest

from sparsespec_sglang.config import SparseSpecArgsError


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_spec_v2_helpers_used_by_the_worker():
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs_func
    from sglang.srt.layers.logprob_processor import compute_spec_v2_logprobs
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch
    from sglang.srt.speculative.eagle_utils import eagle_sample
    from sglang.srt.speculative.ngram_info import NgramVerifyInput
    from sglang.srt.speculative.spec_utils import (
        GrammarTree,
        build_grammar_vocab_mask,
        record_stream_for_v2_verify,
    )

    assert _params(assign_extend_cache_locs_func) == [
        "req_pool_indices", "req_to_token", "start_offset", "end_offset", "batch_size",
        "draft_token_num", "device"]
    assert _params(compute_spec_v2_logprobs) == [
        "batch", "logits_output", "predict", "accept_index", "speculative_num_steps"]
    assert _params(ForwardBatch.init_new) == [
        "batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm"]
    assert _params(eagle_sample) == ["verify_input", "batch", "logits_output", "grammar_mask"]
    assert _params(record_stream_for_v2_verify) == ["batch", "verify_input", "fwd_stream"]
    assert _params(GrammarTree.from_linear_chain) == ["verify_ids_2d"]
    assert _params(build_grammar_vocab_mask) == ["reqs", "tree", "sampling_info", "device", "barrier"]
    assert {"draft_token", "custom_mask", "positions", "retrieve_index", "retrieve_next_token",
            "retrieve_next_sibling", "draft_token_num", "new_seq_lens", "accept_tokens",
            "accept_lens"} <= set(_params(NgramVerifyInput.__init__))


def test_generation_batch_result_fields():
    from sglang.srt.managers.utils import GenerationBatchResult

    names = {f.name for f in dataclasses.fields(GenerationBatchResult)}
    assert {"logits_output", "next_token_ids", "can_run_cuda_graph", "accept_lens",
            "new_seq_lens", "next_draft_input", "speculative_num_draft_tokens"} <= names


def test_attention_backend_methods_overridden():
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    forward = ["self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache", "sinks",
               "score_mod", "aux_tensors"]
    assert _params(TritonAttnBackend.forward_decode) == forward
    assert _params(TritonAttnBackend.forward_extend) == forward
    assert _params(TritonAttnBackend.init_forward_metadata) == ["self", "forward_batch"]
    assert _params(TritonAttnBackend.init_forward_metadata_out_graph) == [
        "self", "forward_batch", "in_capture"]
    assert _params(TritonAttnBackend.init_forward_metadata_in_graph) == ["self", "forward_batch"]
    assert _params(TritonAttnBackend.init_cuda_graph_state)[:3] == ["self", "max_bs", "max_num_tokens"]


def test_draft_graph_runner_interface():
    from sglang.srt.model_executor.forward_context import ForwardContext
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    assert _params(DecodeCudaGraphRunner.__init__)[:2] == ["self", "model_runner"]
    assert _params(DecodeCudaGraphRunner.can_run_graph) == ["self", "forward_batch"]
    assert _params(DecodeCudaGraphRunner.execute)[:2] == ["self", "forward_batch"]
    assert _params(ForwardContext.__init__) == ["self", "attn_backend"]


def test_factories_pick_the_plugin_classes():
    from types import SimpleNamespace

    from sparsespec_sglang.attention import create_backend
    from sparsespec_sglang.plugin import _worker_factory
    from sparsespec_sglang.worker import SparseSpecWorker

    assert _worker_factory(SimpleNamespace(device="cuda")) is SparseSpecWorker
    with pytest.raises(SparseSpecArgsError, match="CUDA GPUs only"):
        _worker_factory(SimpleNamespace(device="cpu"))
    with pytest.raises(ValueError, match="MLA"):
        create_backend(SimpleNamespace(use_mla_backend=True))


def test_deterministic_decode_path_used_by_the_verify():
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.kvcache.kv_indices import create_flashinfer_kv_indices_triton
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    assert _params(decode_attention_fwd)[:19] == [
        "q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "attn_lse",
        "num_kv_splits", "max_kv_splits", "sm_scale", "k_scale", "v_scale", "logit_cap", "sinks",
        "xai_temperature_len", "has_mla", "use_pdl", "page_size"]
    assert list(create_flashinfer_kv_indices_triton.arg_names) == [
        "req_to_token_ptr", "req_pool_indices_ptr", "page_kernel_lens_ptr", "kv_indptr",
        "kv_start_idx", "kv_indices_ptr", "req_to_token_ptr_stride"]
    # Attributes the backend reads from its TritonAttnBackend base in deterministic mode, and
    # the split rule it must reproduce (a fixed tile per KV split).
    source = inspect.getsource(TritonAttnBackend)
    for attr in ("self.enable_deterministic", "self.split_tile_size", "self.max_kv_splits",
                 "self.use_pdl", "self.page_size", "self.decode_attention_fwd"):
        assert f"{attr} =" in source, attr
    assert "expanded_seq_lens + self.split_tile_size - 1" in inspect.getsource(
        TritonAttnBackend.get_num_kv_splits)
