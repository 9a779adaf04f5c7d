"""The SGLang 0.5.17 internals the worker, backend and draft graphs call, checked on CPU.

The end-to-end path only runs on a GPU host; these checks fail in CI as soon as an SGLang
upgrade renames a parameter the plugin passes, instead of at the first request on a server.
"""

import dataclasses
import inspect

import pytest

from sparsespec_sglang.config import SparseSpecArgsError
from test_plugin import sglang_loaded  # noqa: F401


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
    from sparsespec_sglang.algorithm import worker_factory as _worker_factory
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


def _attribute_sites(attr: str, files: tuple[str, ...] | None = None) -> dict[str, int]:
    """``{"path:Class.method": count}`` of every ``.attr`` in SGLang's source (or in ``files``,
    paths relative to the sglang package), keyed by the enclosing definition."""
    import ast
    import os

    import sglang

    root = os.path.dirname(sglang.__file__)
    paths = ([os.path.join(root, f) for f in files] if files is not None else
             [os.path.join(d, f) for d, _, names in os.walk(root) for f in names if f.endswith(".py")])
    found: dict[str, int] = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        if f".{attr}" not in source:
            continue

        def visit(node, scope):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, scope + [child.name])
                    continue
                if isinstance(child, ast.Attribute) and child.attr == attr:
                    key = f"{os.path.relpath(path, root)}:{'.'.join(scope)}"
                    found[key] = found.get(key, 0) + 1
                visit(child, scope)

        visit(ast.parse(source), [])
    return found


# SPARSESPEC answers is_ngram() True. Every SGLang 0.5.17 branch on it, and what SPARSESPEC needs
# there; a new or moved call site fails the test below until it is read and added here.
IS_NGRAM_SITES = {
    "srt/managers/overlap_utils.py:decide_needs_cpu_seq_lens":
        "NGRAM-like: host seq_lens kept (the worker reads seq_lens_cpu for its verify layout)",
    "srt/managers/overlap_utils.py:FutureMap._resolve_spec_extras":
        "NGRAM-like: no EAGLE draft relay to resolve (state lives in PillarState, by pool row)",
    "srt/managers/overlap_utils.py:FutureMap.stash":
        "NGRAM-like: nothing stashed in the FutureMap (no EagleDraftInput)",
    "srt/managers/scheduler.py:Scheduler._relay_forward_payload":
        "NGRAM-like: the step's draft state is relayed through batch.spec_info, not the FutureMap",
    "srt/managers/scheduler.py:Scheduler.maybe_init_draft_worker":
        "NOT NGRAM: the external corpus manager is dropped again by patches/corpus_manager.py",
    "srt/mem_cache/kv_cache_builder.py:get_draft_kv_pool":
        "NGRAM-like: no draft KV pool (drafts write the target model's pool)",
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.can_run_graph":
        "NGRAM-like: a verify graph replays only batch_size x (k + 1) tokens (width 1 for the "
        "draft graphs, which replay batch_size tokens)",
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.get_spec_info":
        "NGRAM-like: verify graphs are captured with a dummy NgramVerifyInput (a k + 1 chain)",
    "srt/speculative/spec_info.py:create_dummy_verify_input":
        "NGRAM-like: the same dummy NgramVerifyInput for BaseRunner's warm-up forwards",
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.create_worker":
        "not reached: an enum method; SPARSESPEC is a CustomSpecAlgo (its factory makes the worker)",
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.handle_server_args":
        "not reached: an enum method; validate_server_args handles SPARSESPEC's arguments",
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.has_draft_kv":
        "not reached: an enum method; SparseSpecAlgo.has_draft_kv answers False itself",
}


def test_every_is_ngram_call_site_is_accounted_for():
    sites = _attribute_sites("is_ngram")
    calls = {k: n for k, n in sites.items() if not k.endswith(".is_ngram")}  # definitions
    assert set(calls) == set(IS_NGRAM_SITES), (
        "SGLang's is_ngram() call sites changed; read each and update IS_NGRAM_SITES "
        f"(added: {sorted(set(calls) - set(IS_NGRAM_SITES))}, "
        f"gone: {sorted(set(IS_NGRAM_SITES) - set(calls))})")
    assert all(n == 1 for n in calls.values()), calls


def test_sparsespec_answers_as_ngram_where_the_sites_expect(sglang_loaded):  # noqa: F811
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("SPARSESPEC")
    assert algo.is_ngram() and not algo.has_draft_kv()
    assert not (algo.is_eagle() or algo.is_standalone() or algo.is_dflash_family() or algo.is_dspark())


# The runner of the draft / unified CUDA graphs is SGLang's DecodeCudaGraphRunner, built while the
# model runner reads as non-speculative (draft_graph.SingleTokenGraphRunner). These are every
# spec_algorithm read of that runner's classes and of the width it asks the model runner for:
# built, it is a width-1 DECODE runner; replayed, it sees SPARSESPEC again, where only
# can_run_graph's NGRAM check (batch_size x 1 tokens) and EAGLE/DFLASH-only branches read it.
GRAPH_RUNNER_SPEC_READS = {
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.__init__": 4,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner._forward_is_dp_local": 1,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.can_run_graph": 1,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.capture_one_shape.run_once": 1,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.capture_prepare": 1,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.execute": 1,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.get_spec_info": 5,
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.load_batch": 5,
    "srt/model_executor/runner/base_runner.py:BaseRunner._dummy_run": 6,
    "srt/model_executor/runner/base_runner.py:BaseRunner.warmup": 1,
    "srt/model_executor/model_runner.py:ModelRunner.decode_num_tokens_per_req": 2,
}


def test_the_draft_graph_runner_reads_of_spec_algorithm_are_pinned():
    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    assert [c.__name__ for c in DecodeCudaGraphRunner.__mro__[:3]] == [
        "DecodeCudaGraphRunner", "BaseCudaGraphRunner", "BaseRunner"]
    files = ("srt/model_executor/runner/decode_cuda_graph_runner.py",
             "srt/model_executor/runner/base_cuda_graph_runner.py",
             "srt/model_executor/runner/base_runner.py")
    reads = _attribute_sites("spec_algorithm", files)
    reads.update({k: n for k, n in _attribute_sites("spec_algorithm", ("srt/model_executor/model_runner.py",))
                  .items() if k.endswith("ModelRunner.decode_num_tokens_per_req")})
    assert reads == GRAPH_RUNNER_SPEC_READS
    # Width and mode come from the model runner's algorithm; the sizes from the hooked function.
    init = inspect.getsource(DecodeCudaGraphRunner.__init__)
    assert "model_runner.decode_num_tokens_per_req(" in init
    assert "if model_runner.spec_algorithm.is_speculative():" in init
    assert "get_batch_sizes_to_capture(" in init
    from sglang.srt.model_executor.model_runner import ModelRunner

    assert "if self.spec_algorithm.is_speculative():" in inspect.getsource(ModelRunner.decode_num_tokens_per_req)


def test_graph_capture_sizes_hook_routes_only_inside_capturing(sglang_loaded):  # noqa: F811
    from sglang.srt.model_executor.runner import base_cuda_graph_runner, decode_cuda_graph_runner

    from sparsespec_sglang.patches import graph_capture_sizes

    from sglang.srt.model_executor.runner.decode_cuda_graph_runner import DecodeCudaGraphRunner

    assert _params(base_cuda_graph_runner.get_batch_sizes_to_capture) == [
        "model_runner", "captured_req_width"]
    # The hook must sit on the name the runner resolves when it runs (its module's global), whatever
    # the import order: schedulers import the runner module before the plugin's hooks are applied.
    (target, _, _), = graph_capture_sizes.HOOKS
    assert target == f"{DecodeCudaGraphRunner.__module__}.get_batch_sizes_to_capture"
    fn = DecodeCudaGraphRunner.__init__.__globals__["get_batch_sizes_to_capture"]
    assert fn is decode_cuda_graph_runner.get_batch_sizes_to_capture
    with graph_capture_sizes.capturing([8, 2, 8, 4]):
        assert fn(object(), 1) == ([2, 4, 8], [])
    with graph_capture_sizes.capturing(None), pytest.raises(AttributeError):
        fn(object(), 1)  # SGLang's own sizing, which reads the (fake) model runner
    # The hook itself: outside ``capturing`` it is SGLang's function.
    assert graph_capture_sizes.get_batch_sizes_to_capture(lambda mr, w: ("own", w), None, 3) == ("own", 3)


def test_corpus_manager_dropped_on_sparsespec_servers_only(sglang_loaded):  # noqa: F811
    from types import SimpleNamespace

    from sglang.srt.managers.scheduler import Scheduler

    from sparsespec_sglang.patches import corpus_manager

    assert hasattr(Scheduler.maybe_init_draft_worker, "__wrapped__")  # the hook is applied
    assert "ExternalCorpusManager(" in inspect.getsource(Scheduler.maybe_init_draft_worker.__wrapped__)
    for algo, kept in (("SPARSESPEC", False), ("NGRAM", True), (None, True)):
        manager = object()
        sched = SimpleNamespace(server_args=SimpleNamespace(speculative_algorithm=algo),
                                external_corpus_manager=manager)
        corpus_manager.maybe_init_draft_worker(None, sched)
        assert (sched.external_corpus_manager is manager) == kept, algo
