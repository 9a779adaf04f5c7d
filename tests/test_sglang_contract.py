"""The SGLang internals the worker, backend and draft graphs call, checked on CPU for the installed
release (0.5.17 to 0.5.23).

The end-to-end path only runs on a GPU host; these checks fail in CI as soon as an SGLang
upgrade renames a parameter the plugin passes, instead of at the first request on a server.
Where releases differ, a table keyed by the first release of each form pins every release's
expectation (``_by_release``), and the plugin reaches the release's form through
``sparsespec_sglang.compat``.
"""

import ast
import dataclasses
import inspect
import os
import re
from types import SimpleNamespace
from typing import Optional, TypeVar

import pytest
import torch
from packaging.version import Version

from sparsespec_sglang import compat
from sparsespec_sglang.config import SparseSpecArgsError
from test_plugin import sglang_loaded  # noqa: F401

T = TypeVar("T")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _by_release(table: dict[str, T]) -> T:
    """The entry of the newest release in ``table`` that is not after the installed one."""
    return table[max((r for r in table if compat.since(r)), key=Version)]


def _in_releases(spans: tuple[tuple[str, Optional[str]], ...]) -> bool:
    """Whether the installed release is in one of ``spans``: [first, until) (None: still there)."""
    return any(compat.since(first) and (until is None or not compat.since(until)) for first, until in spans)


def _sglang_root() -> str:
    import sglang

    return os.path.dirname(sglang.__file__)


def _function_node(path: str, qualname: str) -> ast.AST:
    """The AST of ``qualname`` in SGLang's ``path`` (relative to the sglang package)."""
    with open(os.path.join(_sglang_root(), path), encoding="utf-8") as fh:
        node: ast.AST = ast.parse(fh.read())
    for part in qualname.split("."):
        node = next(c for c in ast.iter_child_nodes(node)
                    if isinstance(c, (ast.ClassDef, ast.FunctionDef)) and c.name == part)
    return node


def test_spec_v2_helpers_used_by_the_worker():
    from sparsespec_sglang.compat import (
        ForwardBatch,
        GrammarTree,
        NgramVerifyInput,
        assign_extend_cache_locs_func,
        build_grammar_vocab_mask,
        eagle_sample,
        record_stream_for_v2_verify,
    )

    assert _params(assign_extend_cache_locs_func) == [
        "req_pool_indices", "req_to_token", "start_offset", "end_offset", "batch_size",
        "draft_token_num", "device"]
    # Later releases add keyword arguments with defaults: a forward without an iteration plan
    # builds its own from the batch (plain pool: out_cache_loc unchanged).
    assert _params(ForwardBatch.init_new) == _by_release({
        "0.5.17": ["batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm"],
        "0.5.22": ["batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm",
                   "extend_position_info", "spec_mrope_positions", "kv_loc_plan", "write_cols"],
    })
    inspect.signature(ForwardBatch.init_new).bind(object(), object(), return_hidden_states_before_norm=False)
    # The schedules call eagle_sample with the first four; the UNO and watermark extras default off.
    assert _params(eagle_sample) == _by_release({
        "0.5.17": ["verify_input", "batch", "logits_output", "grammar_mask"],
        "0.5.20": ["verify_input", "batch", "logits_output", "grammar_mask", "uno_target_max_top_k"],
        "0.5.22": ["verify_input", "batch", "logits_output", "grammar_mask", "uno_target_max_top_k",
                   "watermark_state", "watermark_full_mask"],
    })
    extras = list(inspect.signature(eagle_sample).parameters.values())[4:]
    assert all(p.default in (None, True) for p in extras), extras
    assert _params(record_stream_for_v2_verify) == ["batch", "verify_input", "fwd_stream"]
    assert _params(GrammarTree.from_linear_chain) == ["verify_ids_2d"]
    assert _params(build_grammar_vocab_mask) == ["reqs", "tree", "sampling_info", "device", "barrier"]
    assert {"draft_token", "custom_mask", "positions", "retrieve_index", "retrieve_next_token",
            "retrieve_next_sibling", "draft_token_num", "new_seq_lens", "accept_tokens",
            "accept_lens"} <= set(_params(NgramVerifyInput.__init__))


def test_spec_logprobs_of_an_accepted_chain():
    """``compat.compute_spec_logprobs`` runs this release's SGLang logprob helper (renamed, its
    index made keyword-only in 0.5.18) on a verified chain: accepted token j of request b gets
    its logprob at the verify row accept_index[b, j] (temperature-scaled when sampling)."""
    import sglang.srt.layers.logprob_processor as logprob_processor

    assert _by_release({"0.5.17": "compute_spec_v2_logprobs", "0.5.18": "compute_spec_logprobs"}) in vars(
        logprob_processor)
    gen = torch.Generator().manual_seed(0)
    bs, width, vocab = 2, 4, 11
    logits = torch.randn(bs * width, vocab, generator=gen)
    predict = torch.randint(0, vocab, (bs * width,), generator=gen, dtype=torch.int32)
    accept_index = torch.tensor([[0, 1, 2, -1], [4, 5, 6, 7]], dtype=torch.int32)
    temperatures = torch.tensor([[0.7], [1.3]])
    batch = SimpleNamespace(seq_lens=torch.tensor([9, 12]), top_logprobs_nums=None,
                            token_ids_logprobs=None,
                            sampling_info=SimpleNamespace(is_all_greedy=False, temperatures=temperatures))
    out = SimpleNamespace(next_token_logits=logits)
    compat.compute_spec_logprobs(batch, out, predict, accept_index)
    rows = accept_index.long()
    want = torch.log_softmax(logits[rows] / temperatures.view(bs, 1, 1), dim=-1).gather(
        -1, predict.long()[rows].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.next_token_logprobs, want)


def test_generation_batch_result_fields():
    from sparsespec_sglang.compat import GenerationBatchResult

    names = {f.name for f in dataclasses.fields(GenerationBatchResult)}
    assert {"logits_output", "next_token_ids", "can_run_cuda_graph", "accept_lens",
            "new_seq_lens", "next_draft_input", "speculative_num_draft_tokens"} <= names


def test_attention_backend_methods_overridden():
    from sparsespec_sglang.compat import TritonAttnBackend

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
    from sparsespec_sglang.compat import DecodeCudaGraphRunner, ForwardContext, forward_context

    assert _params(DecodeCudaGraphRunner.__init__)[:2] == ["self", "model_runner"]
    assert _params(DecodeCudaGraphRunner.can_run_graph) == ["self", "forward_batch"]
    assert _params(DecodeCudaGraphRunner.execute)[:2] == ["self", "forward_batch"]
    assert [f.name for f in dataclasses.fields(ForwardContext)] == _by_release({
        "0.5.17": ["attn_backend"],
        "0.5.23": ["attn_backend", "moe_num_token_non_padded"],
    })
    assert _params(forward_context) == _by_release({"0.5.17": ["ctx"], "0.5.23": ["ctx", "forward_batch"]})


def test_a_graph_runner_captures_and_replays_on_the_backend_it_is_given(sglang_loaded):  # noqa: F811
    """--sparsespec-dense-backend: the plain decode graphs of all-dense passes are SGLang's decode
    graph runner built with a second backend (``attn_backend=``), which its graph state, capture and
    replay metadata then use instead of the model runner's."""
    from sparsespec_sglang.compat import ATTENTION_BACKENDS, DecodeCudaGraphRunner

    assert "attn_backend" in _params(DecodeCudaGraphRunner.__init__)
    init = inspect.getsource(DecodeCudaGraphRunner.__init__)
    assert "self.attn_backend = attn_backend or model_runner.attn_backend" in init
    assert "self.attn_backend.init_cuda_graph_state(self.max_bs, self.max_num_token)" in init
    assert "attn_backend = self.attn_backend" in inspect.getsource(DecodeCudaGraphRunner.capture_prepare)
    # The replay's metadata: load_batch up to 0.5.22, a helper from 0.5.23.
    replay, line = _by_release({"0.5.17": ("load_batch", "attn_backend = self.attn_backend"),
                                "0.5.23": ("_replay_attn_backend", "return self.attn_backend")})
    assert line in inspect.getsource(getattr(DecodeCudaGraphRunner, replay))
    assert "flashinfer" in ATTENTION_BACKENDS and "triton" in ATTENTION_BACKENDS


def test_draft_graph_replays_run_in_the_context_sglangs_model_runner_publishes():
    """``DraftGraphs.run`` wraps a replay in ``compat.forward_context_of``: the context SGLang's
    ``ModelRunner._forward_raw`` publishes (from 0.5.23 with the batch's MoE token bound)."""
    from sglang.srt.model_executor.forward_context import get_forward_context, has_forward_context
    from sglang.srt.model_executor.model_runner import ModelRunner

    from sparsespec_sglang.compat import forward_context_of

    source = inspect.getsource(ModelRunner._forward_raw)
    assert _by_release({
        "0.5.17": "forward_context(ForwardContext(attn_backend=self.attn_backend))",
        "0.5.23": "ForwardContext(attn_backend=self.attn_backend),\n                forward_batch=forward_batch,",
    }) in source
    backend, bound = object(), (lambda: None)
    with forward_context_of(backend, SimpleNamespace(moe_num_token_non_padded=bound)):
        ctx = get_forward_context()
        assert ctx.attn_backend is backend
        assert getattr(ctx, "moe_num_token_non_padded", bound) is bound
    assert not has_forward_context()


def test_factories_pick_the_plugin_classes(monkeypatch):
    from sglang.srt.runtime_context import get_context

    from sparsespec_sglang.config import CPU_TEST_ENV

    from sparsespec_sglang.algorithm import worker_factory
    from sparsespec_sglang.attention import create_backend
    from sparsespec_sglang.worker import SparseSpecWorker

    # The record a scheduler hands the factory keeps the raw --device (None: auto-detected) from
    # 0.5.19; the factory reads the resolved one from SGLang's runtime context.
    raw = SimpleNamespace(device=None)
    with get_context().override_server_args(device="cuda"):
        assert worker_factory(raw) is SparseSpecWorker
    monkeypatch.delenv(CPU_TEST_ENV)  # a user's process: no test mode
    with get_context().override_server_args(device="cpu"):
        with pytest.raises(SparseSpecArgsError, match=r"CUDA GPUs only \(--device cpu\)"):
            worker_factory(SimpleNamespace(device="cuda"))
    with pytest.raises(ValueError, match="MLA"):
        create_backend(SimpleNamespace(use_mla_backend=True))


def test_the_runtime_settings_the_worker_reads():
    """The worker reads ranks, the sampling backend and the metrics settings from SGLang's runtime
    context (what SGLang's own workers and sampler read), not from the raw record."""
    from sglang.srt.runtime_context import get_context

    from sparsespec_sglang.compat import get_device, get_exec, get_observability, get_parallel, get_serving

    with get_context().override_server_args(device="cuda", sampling_backend="flashinfer",
                                            enable_metrics=True, served_model_name="m"):
        with get_parallel().override(tp_rank=3, tp_size=4, attn_tp_size=4, moe_tp_size=4):
            assert (get_parallel().tp_rank, get_parallel().tp_size) == (3, 4)
        assert get_device().device == "cuda"
        assert get_exec().kernel.sampling_backend == "flashinfer"
        assert get_observability().enable_metrics is True
        assert get_serving().served_model_name == "m"
    from sglang.srt.layers.sampler import Sampler

    assert "get_exec().kernel.sampling_backend" in inspect.getsource(Sampler)


def _worker_calls(methods: set[str]) -> dict[tuple[str, int], set[str]]:
    """``{(method, positional args): keyword names}`` of every call of ``methods`` on the
    scheduler's ``draft_worker`` / ``model_worker`` (srt/managers); a ``**kwargs`` argument
    contributes every key written into that dict in the calling function."""
    found: dict[tuple[str, int], set[str]] = {}
    root = os.path.join(_sglang_root(), "srt", "managers")
    for dirpath, _, names in os.walk(root):
        for name in names:
            if not name.endswith(".py"):
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                tree = ast.parse(fh.read())
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for call in ast.walk(fn):
                    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr in methods and isinstance(call.func.value, ast.Attribute)
                            and call.func.value.attr in ("draft_worker", "model_worker")):
                        continue
                    keys = found.setdefault((call.func.attr, len(call.args)), set())
                    for kw in call.keywords:
                        if kw.arg is not None:
                            keys.add(kw.arg)
                        elif isinstance(kw.value, ast.Name):
                            keys |= _dict_keys_of(fn, kw.value.id)
    return found


def _dict_keys_of(fn: ast.AST, var: str) -> set[str]:
    keys = set()
    for node in ast.walk(fn):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            if isinstance(target, ast.Name) and target.id == var:
                for d in ast.walk(node.value):
                    if isinstance(d, ast.Dict):
                        keys |= {k.value for k in d.keys if isinstance(k, ast.Constant)}
                    if isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == "dict":
                        keys |= {kw.arg for kw in d.keywords if kw.arg is not None}
            if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name)
                    and target.value.id == var and isinstance(target.slice, ast.Constant)):
                keys.add(target.slice.value)
    return keys


def test_the_scheduler_builds_and_drives_the_worker_as_it_accepts(sglang_loaded):  # noqa: F811
    """Every keyword SGLang's scheduler builds the draft worker with, and passes to the worker
    methods SparseSpecWorker defines, binds to them."""
    from sparsespec_sglang.compat import SpeculativeAlgorithm
    from sparsespec_sglang.worker import SparseSpecWorker

    # Built with keywords only: server_args, gpu_id, nccl_port, target_worker (and ps up to 0.5.20).
    init = _function_node("srt/managers/scheduler.py", "Scheduler.maybe_init_draft_worker")
    built = _dict_keys_of(init, "draft_worker_kwargs")
    assert built == _by_release({
        "0.5.17": {"server_args", "gpu_id", "ps", "nccl_port", "target_worker"},
        "0.5.21": {"server_args", "gpu_id", "nccl_port", "target_worker"},
    })
    assert "DraftWorkerClass(**draft_worker_kwargs)" in ast.unparse(init)
    inspect.signature(SparseSpecWorker).bind(**dict.fromkeys(built))
    calls = _worker_calls({"forward_batch_generation", "alloc_memory_pool", "init_attention_backends",
                           "init_cuda_graphs"})
    assert calls == {
        ("forward_batch_generation", 1): {"on_publish", "grammar_barrier", "pp_proxy_tensors"},
        ("alloc_memory_pool", 0): {"memory_pool_config", "req_to_token_pool", "token_to_kv_pool_allocator"},
        ("init_attention_backends", 0): set(),
        ("init_cuda_graphs", 0): set(),
    }
    worker = SparseSpecWorker.__new__(SparseSpecWorker)
    for (method, num_args), keys in calls.items():
        # grammar_barrier goes only to an algorithm whose verify advances the grammar itself.
        keys = keys - {"grammar_barrier"}
        inspect.signature(getattr(worker, method)).bind(*[None] * num_args, **dict.fromkeys(keys))
    assert not SpeculativeAlgorithm.from_string("SPARSESPEC").supports_grammar_overlap()
    run_batch = _function_node("srt/managers/scheduler.py", "Scheduler.run_batch")
    assert any(isinstance(node, ast.If)
               and ast.unparse(node.test) == "batch.spec_algorithm.supports_grammar_overlap()"
               and ast.unparse(node.body) == "fwd_kwargs['grammar_barrier'] = self._advance_pending_grammar"
               for node in ast.walk(run_batch))


def test_eager_passes_run_on_the_batchs_own_tensors():
    """A unified pass has up to ~2x as many rows as the server's max running requests; the eager
    runner copies a batch into buffers of that size unless ``SGLANG_EAGER_INPUT_NO_COPY``."""
    from sglang.srt.model_executor.runner.eager_runner import EagerRunner

    from sparsespec_sglang.compat import envs

    source = inspect.getsource(EagerRunner)
    assert "if envs.SGLANG_EAGER_INPUT_NO_COPY.get():\n            return replace(forward_batch)" in source
    with envs.SGLANG_EAGER_INPUT_NO_COPY.override(True):
        assert envs.SGLANG_EAGER_INPUT_NO_COPY.get() is True


def test_deterministic_decode_path_used_by_the_verify():
    from sparsespec_sglang.compat import (
        TritonAttnBackend,
        create_flashinfer_kv_indices_triton,
        decode_attention_fwd,
    )

    assert _params(decode_attention_fwd)[:19] == [
        "q", "k_buffer", "v_buffer", "o", "kv_indptr", "kv_indices", "attn_logits", "attn_lse",
        "num_kv_splits", "max_kv_splits", "sm_scale", "k_scale", "v_scale", "logit_cap", "sinks",
        "xai_temperature_len", "has_mla", "use_pdl", "page_size"]
    # The call of attention.py binds; what it leaves out (score_mod, the ROCm-only Lean and
    # uneven-batch inputs) keeps its default, as in SGLang's own deterministic decode on CUDA.
    t = torch.empty(0)
    inspect.signature(decode_attention_fwd).bind(
        t, t, t, t, t, t, t, t, t, 8, 0.1, 1.0, 1.0, logit_cap=0.0, xai_temperature_len=-1,
        use_pdl=False, page_size=1)
    # verify_as_decode_rows launches the kv_indices kernel with these 7 arguments; the later
    # ones (0.5.19 on) must keep their defaults' meaning: a token-granular req_to_token, one
    # program per request, no id remapping.
    kernel = inspect.signature(create_flashinfer_kv_indices_triton.fn).parameters.values()
    assert [(p.name, "-" if p.default is p.empty else p.default) for p in kernel] == _by_release({
        "0.5.17": [("req_to_token_ptr", "-"), ("req_pool_indices_ptr", "-"), ("page_kernel_lens_ptr", "-"),
                   ("kv_indptr", "-"), ("kv_start_idx", "-"), ("kv_indices_ptr", "-"),
                   ("req_to_token_ptr_stride", "-")],
        "0.5.19": [("req_to_token_ptr", "-"), ("req_pool_indices_ptr", "-"), ("page_kernel_lens_ptr", "-"),
                   ("kv_indptr", "-"), ("kv_start_idx", "-"), ("kv_indices_ptr", "-"),
                   ("req_to_token_ptr_stride", "-"), ("ENTRY_PAGE_SIZE", 1)],
        "0.5.20": [("req_to_token_ptr", "-"), ("req_pool_indices_ptr", "-"), ("page_kernel_lens_ptr", "-"),
                   ("kv_indptr", "-"), ("kv_start_idx", "-"), ("kv_indices_ptr", "-"),
                   ("req_to_token_ptr_stride", "-"), ("ENTRY_PAGE_SIZE", 1), ("TOKEN_BLOCK_PARALLEL", False)],
        "0.5.22": [("req_to_token_ptr", "-"), ("req_pool_indices_ptr", "-"), ("page_kernel_lens_ptr", "-"),
                   ("kv_indptr", "-"), ("kv_start_idx", "-"), ("kv_indices_ptr", "-"),
                   ("req_to_token_ptr_stride", "-"), ("ENTRY_PAGE_SIZE", 1), ("TOKEN_BLOCK_PARALLEL", False),
                   ("token_mapping", None)],
    })
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
    root = _sglang_root()
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


ALWAYS = (("0.5.17", None),)

# SPARSESPEC answers is_ngram() True. Every SGLang branch on it, the releases that have it
# ([first, until) spans) and what SPARSESPEC needs there; a new or moved call site fails the test
# below until it is read and added here.
IS_NGRAM_SITES = {
    "srt/managers/overlap_utils.py:decide_needs_cpu_seq_lens": (
        ALWAYS, "NGRAM-like: host seq_lens kept (the worker reads seq_lens_cpu for its verify layout)"),
    "srt/managers/overlap_utils.py:FutureMap._resolve_spec_extras": (
        ALWAYS, "NGRAM-like: no EAGLE draft relay to resolve (state lives in PillarState, by pool row)"),
    "srt/managers/overlap_utils.py:FutureMap.stash": (
        ALWAYS, "NGRAM-like: nothing stashed in the FutureMap (no EagleDraftInput)"),
    "srt/managers/scheduler.py:Scheduler._relay_forward_payload": (
        ALWAYS, "NGRAM-like: the step's draft state is relayed through batch.spec_info, not the FutureMap"),
    "srt/managers/scheduler.py:Scheduler.maybe_init_draft_worker": (
        ALWAYS, "NOT NGRAM: the external corpus manager is dropped again by patches/corpus_manager.py"),
    "srt/mem_cache/kv_cache_builder.py:get_draft_kv_pool": (
        (("0.5.17", "0.5.18"), ("0.5.19", "0.5.21")),
        "NGRAM-like: no draft KV pool (drafts write the target model's pool)"),
    "srt/speculative/base_spec_worker.py:BaseSpecWorker._draft_model_runners": (
        (("0.5.18", None),),
        "NGRAM-like: no draft model runners, so no draft KV pool and no HiCache draft plan (the "
        "worker's draft_worker is None too)"),
    "srt/arg_groups/moe_hook.py:validate_deepep_v2_speculative_draft": (
        (("0.5.19", None),),
        "NGRAM-like: no draft model, so no draft MoE all-to-all backend inherited from the target"),
    "srt/models/qwen4_exp.py:_prepare_ple_batch": (
        (("0.5.20", None),),
        "not reached: Qwen4 PLE models refuse NGRAM; validate_server_args admits only the "
        "architectures of config.SUPPORTED_ARCHITECTURES"),
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.can_run_graph": (
        ALWAYS, "NGRAM-like: a verify graph replays only batch_size x (k + 1) tokens (width 1 for the "
        "draft graphs, which replay batch_size tokens)"),
    "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner.get_spec_info": (
        ALWAYS, "NGRAM-like: verify graphs are captured with a dummy NgramVerifyInput (a k + 1 chain)"),
    "srt/speculative/spec_info.py:create_dummy_verify_input": (
        ALWAYS, "NGRAM-like: the same dummy NgramVerifyInput for BaseRunner's warm-up forwards"),
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.create_worker": (
        ALWAYS, "not reached: an enum method; SPARSESPEC is a CustomSpecAlgo (its factory makes the worker)"),
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.handle_server_args": (
        ALWAYS, "not reached: an enum method; validate_server_args handles SPARSESPEC's arguments"),
    "srt/speculative/spec_info.py:SpeculativeAlgorithm.has_draft_kv": (
        ALWAYS, "not reached: an enum method; SparseSpecAlgo.has_draft_kv answers False itself"),
}


def test_every_is_ngram_call_site_is_accounted_for():
    sites = _attribute_sites("is_ngram")
    calls = {k: n for k, n in sites.items() if not k.endswith(".is_ngram")}  # definitions
    expected = {site for site, (spans, _) in IS_NGRAM_SITES.items() if _in_releases(spans)}
    assert set(calls) == expected, (
        "SGLang's is_ngram() call sites changed; read each and update IS_NGRAM_SITES "
        f"(added: {sorted(set(calls) - expected)}, gone: {sorted(expected - set(calls))})")
    assert all(n == 1 for n in calls.values()), calls


def test_sparsespec_answers_as_ngram_where_the_sites_expect(sglang_loaded):  # noqa: F811
    from sparsespec_sglang.compat import SpeculativeAlgorithm

    algo = SpeculativeAlgorithm.from_string("SPARSESPEC")
    assert algo.is_ngram() and not algo.has_draft_kv()
    assert not (algo.is_eagle() or algo.is_standalone() or algo.is_dflash_family() or algo.is_dspark())
    assert algo.get_platform_worker_cls() is None  # the registered factory builds the worker


# The runner of the draft / unified CUDA graphs is SGLang's DecodeCudaGraphRunner, built while the
# model runner reads as non-speculative (draft_graph.SingleTokenGraphRunner). These are every
# spec_algorithm read of that runner's classes and of the width it asks the model runner for, by
# release (0: gone): built, it is a width-1 DECODE runner (no ragged verify, no metadata glue);
# replayed, it sees SPARSESPEC again, where only can_run_graph's NGRAM check (batch_size x 1
# tokens) and branches for EAGLE, DFLASH or DSPARK (or for draft-model runners) read it.
_DCGR = "srt/model_executor/runner/decode_cuda_graph_runner.py:DecodeCudaGraphRunner"
_BR = "srt/model_executor/runner/base_runner.py:BaseRunner"
GRAPH_RUNNER_SPEC_READS = {
    f"{_DCGR}.__init__": {"0.5.17": 4, "0.5.19": 5},
    f"{_DCGR}._forward_is_dp_local": {"0.5.17": 1},
    f"{_DCGR}.can_run_graph": {"0.5.17": 1},
    f"{_DCGR}.capture_one_shape.run_once": {"0.5.17": 1},
    f"{_DCGR}.capture_prepare": {"0.5.17": 1},
    f"{_DCGR}.execute": {"0.5.17": 1, "0.5.18": 0},
    f"{_DCGR}.get_spec_info": {"0.5.17": 5},
    f"{_DCGR}.load_batch": {"0.5.17": 5, "0.5.18": 2},
    f"{_DCGR}._forks_draft_metadata_prep": {"0.5.17": 0, "0.5.23": 1},
    f"{_DCGR}._glues_target_verify_metadata": {"0.5.17": 0, "0.5.23": 1},
    f"{_DCGR}._resolve_skips_prefilled_inputs": {"0.5.17": 0, "0.5.23": 1},
    f"{_DCGR}._wants_early_verify_metadata": {"0.5.17": 0, "0.5.23": 1},
    f"{_BR}._dummy_run": {"0.5.17": 6, "0.5.18": 7},
    f"{_BR}.warmup": {"0.5.17": 1, "0.5.23": 0},
    f"{_BR}._warmup": {"0.5.17": 0, "0.5.23": 1},
    "srt/model_executor/model_runner.py:ModelRunner.decode_num_tokens_per_req": {"0.5.17": 2, "0.5.19": 3},
}


def test_the_draft_graph_runner_reads_of_spec_algorithm_are_pinned():
    from sglang.srt.model_executor.model_runner import ModelRunner

    from sparsespec_sglang.compat import DecodeCudaGraphRunner

    assert [c.__name__ for c in DecodeCudaGraphRunner.__mro__[:3]] == [
        "DecodeCudaGraphRunner", "BaseCudaGraphRunner", "BaseRunner"]
    files = ("srt/model_executor/runner/decode_cuda_graph_runner.py",
             "srt/model_executor/runner/base_cuda_graph_runner.py",
             "srt/model_executor/runner/base_runner.py")
    reads = _attribute_sites("spec_algorithm", files)
    reads.update({k: n for k, n in _attribute_sites("spec_algorithm", ("srt/model_executor/model_runner.py",))
                  .items() if k.endswith("ModelRunner.decode_num_tokens_per_req")})
    expected = {site: n for site, counts in GRAPH_RUNNER_SPEC_READS.items() if (n := _by_release(counts))}
    assert reads == expected
    # Width and mode come from the model runner's algorithm; the sizes from the hooked function.
    init = inspect.getsource(DecodeCudaGraphRunner.__init__)
    assert "model_runner.decode_num_tokens_per_req(" in init
    assert "if model_runner.spec_algorithm.is_speculative():" in init
    # ...called with the model runner first: the capture sizes ride on it (patches/graph_capture_sizes.py).
    assert re.search(r"get_batch_sizes_to_capture\(\s*model_runner,", init)
    assert "if self.spec_algorithm.is_speculative():" in inspect.getsource(ModelRunner.decode_num_tokens_per_req)


def test_graph_capture_sizes_hook_routes_only_inside_capturing(sglang_loaded):  # noqa: F811
    from sglang.srt.model_executor.runner import base_cuda_graph_runner, decode_cuda_graph_runner

    from sparsespec_sglang.compat import DecodeCudaGraphRunner
    from sparsespec_sglang.patches import graph_capture_sizes

    assert _params(base_cuda_graph_runner.get_batch_sizes_to_capture) == _by_release({
        "0.5.17": ["model_runner", "captured_req_width"],
        "0.5.22": ["model_runner", "captured_req_width", "gathered_buffer_required"],
    })
    # The hook must sit on the name the runner resolves when it runs (its module's global), whatever
    # the import order: schedulers import the runner module before the plugin's hooks are applied.
    (name, _, _), = graph_capture_sizes.HOOKS
    assert compat.hook_target(name) == f"{DecodeCudaGraphRunner.__module__}.get_batch_sizes_to_capture"
    fn = DecodeCudaGraphRunner.__init__.__globals__["get_batch_sizes_to_capture"]
    assert fn is decode_cuda_graph_runner.get_batch_sizes_to_capture
    runner, other = SimpleNamespace(), SimpleNamespace()
    with graph_capture_sizes.capturing(runner, [8, 2, 8, 4]):
        assert fn(runner, 1) == ([2, 4, 8], [])
        with pytest.raises((AttributeError, ValueError)):
            fn(other, 1)  # another runner gets SGLang's own sizing (which fails on a fake runner)
    assert not hasattr(runner, graph_capture_sizes.CAPTURE_SIZES_ATTR)  # only while the runner is built
    with graph_capture_sizes.capturing(runner, None), pytest.raises((AttributeError, ValueError)):
        fn(runner, 1)  # SGLang's own sizing: it reads the (fake) model runner or the unpublished config
    # The hook itself: outside ``capturing`` it is SGLang's function, called as the runner called it.
    own = graph_capture_sizes.get_batch_sizes_to_capture
    assert own(lambda mr, w, **kw: ("own", w, kw), None, 3) == ("own", 3, {})
    assert own(lambda mr, w, **kw: ("own", w, kw), None, 3, gathered_buffer_required=True) == (
        "own", 3, {"gathered_buffer_required": True})


def test_corpus_manager_dropped_on_sparsespec_servers_only(sglang_loaded):  # noqa: F811
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


def test_a_requests_req_to_token_row_is_where_req_pool_row_reads_it():
    """``compat.req_pool_row``: ``Req.req_pool_idx`` up to 0.5.18, ``Req.kv.req_pool_idx`` after."""
    from sglang.srt.managers import schedule_batch

    from sparsespec_sglang.compat import req_pool_row

    init = inspect.getsource(schedule_batch.Req.__init__)
    if compat.since("0.5.19"):
        assert "self.kv = ReqKvInfo()" in init and "req_pool_idx" in schedule_batch.ReqKvInfo.__annotations__
        req = SimpleNamespace(kv=SimpleNamespace(req_pool_idx=7))
    else:
        assert "self.req_pool_idx" in init
        req = SimpleNamespace(req_pool_idx=7)
    assert req_pool_row(req) == 7


def test_a_forward_plan_reaches_the_backend_as_the_batchs_spec_info():
    """``forward_plan.ForwardPlan`` rides on ``spec_info`` from the borrowed ScheduleBatch (or a
    graph capture) to the attention backend, as SGLang's own algorithms' inputs do. Pinned: every
    hop that carries ``spec_info`` on that path, the capture hook the graph runner overrides
    (``get_spec_info``), and the reads SGLang makes of a plan on a DECODE forward."""
    from sglang.srt.model_executor.forward_batch_info import (
        CaptureHiddenMode,
        ForwardBatch,
        get_required_capture_hidden_mode,
    )
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner, eager_runner

    from sparsespec_sglang.compat import DecodeCudaGraphRunner, SpecInput
    from sparsespec_sglang.forward_plan import DraftStep, ForwardPlan

    # ScheduleBatch -> ForwardBatch (schedules set batch.spec_info before init_new).
    assert "spec_info=batch.spec_info," in inspect.getsource(ForwardBatch.init_new)
    assert "spec_info" in {f.name for f in dataclasses.fields(ForwardBatch)}
    # Eager forwards of a unified pass keep the batch's own fields (a dataclass copy keeps spec_info).
    assert "return replace(forward_batch)" in inspect.getsource(eager_runner.EagerRunner.load_batch)
    # Capture: the runner asks get_spec_info for the captured batch's spec_info.
    assert _params(DecodeCudaGraphRunner.get_spec_info) == ["self", "num_tokens"]
    prepare = inspect.getsource(DecodeCudaGraphRunner.capture_prepare)
    assert "spec_info = self.get_spec_info(num_tokens)" in prepare and "spec_info=spec_info," in prepare
    # Replay: the backend's replay-side init sees the live batch's spec_info.
    assert "spec_info=forward_batch.spec_info," in inspect.getsource(decode_cuda_graph_runner.build_replay_fb_view)
    # What SGLang reads of a plan: its width (graph runners), its capture mode (getattr), its phase.
    assert "spec_info.num_tokens_per_req != self.captured_req_width" in inspect.getsource(
        DecodeCudaGraphRunner.can_run_graph)
    assert _params(SpecInput.__init__) == ["self", "spec_input_type"]
    plan = ForwardPlan.sparse_draft(DraftStep.allocate(2, torch.device("cpu")))
    assert isinstance(plan, SpecInput) and plan.num_tokens_per_req == 1
    assert not plan.is_draft_input() and not plan.is_verify_input()
    assert get_required_capture_hidden_mode(CaptureHiddenMode.NULL, plan) == CaptureHiddenMode.NULL


def test_what_adaptive_speculation_reads_of_sglang():
    """``--sparsespec-adaptive on``: the pass-cost prior reads the KV pool's shape
    (``unified.model_shape_prior``), and an all-dense unified pass is a plain DECODE forward with
    no ``spec_info``, which the model runner's verify-width graphs refuse by its width (it runs on
    the schedule's own plain decode graphs, or eagerly)."""
    from sglang.srt.mem_cache.memory_pool import KVCache, MHATokenToKVPool

    from sparsespec_sglang.compat import DecodeCudaGraphRunner

    init = inspect.getsource(KVCache.__init__) + inspect.getsource(MHATokenToKVPool.__init__)
    for attr in ("layer_num", "head_num", "head_dim", "v_head_dim", "store_dtype"):
        assert f"self.{attr} =" in init, attr
    assert "forward_batch.batch_size * self.captured_req_width" in inspect.getsource(
        DecodeCudaGraphRunner.can_run_graph)


def test_the_tp_group_the_first_rank_broadcasts_adaptive_modes_on():
    """Under tensor parallelism the worker takes SGLang's TP group (``get_tp_group()``) for
    ``schedule.TPGroup``: its CPU process group (what SGLang's scheduler broadcasts requests on),
    its first rank's global rank and this rank's."""
    from sglang.srt.distributed.parallel_state import GroupCoordinator

    from sparsespec_sglang.compat import get_tp_group

    assert get_tp_group.__module__ == "sglang.srt.distributed.parallel_state"
    init = inspect.getsource(GroupCoordinator.__init__)
    assert "self.cpu_group = " in init and "self.rank = " in init and "self.ranks = " in init
    assert isinstance(GroupCoordinator.first_rank, property)
    assert "self.ranks[0]" in inspect.getsource(GroupCoordinator.first_rank.fget)
