"""SGLang internals of the decode path: worker, schedules, attention backend, draft graphs, sampling.

``LOCATIONS``: name -> ((first release, "module:qualname"), ...); ``ADAPTERS``: functions here that
smooth over a changed signature (see the package docstring).
"""

from __future__ import annotations

from typing import Any, ContextManager

from sparsespec_sglang.compat.version import since

_FBI = "sglang.srt.model_executor.forward_batch_info"
_CTX = "sglang.srt.runtime_context"
LOCATIONS: dict[str, tuple[tuple[str, str], ...]] = {
    "ScheduleBatch": (("0.5.17", "sglang.srt.managers.schedule_batch:ScheduleBatch"),),
    "GenerationBatchResult": (("0.5.17", "sglang.srt.managers.utils:GenerationBatchResult"),),
    "BaseSpecWorker": (("0.5.17", "sglang.srt.speculative.base_spec_worker:BaseSpecWorker"),),
    "NgramVerifyInput": (("0.5.17", "sglang.srt.speculative.ngram_info:NgramVerifyInput"),),
    "record_stream_for_v2_verify": (
        ("0.5.17", "sglang.srt.speculative.spec_utils:record_stream_for_v2_verify"),),
    "GrammarTree": (("0.5.17", "sglang.srt.speculative.spec_utils:GrammarTree"),),
    "build_grammar_vocab_mask": (("0.5.17", "sglang.srt.speculative.spec_utils:build_grammar_vocab_mask"),),
    "SpeculativeAlgorithm": (("0.5.17", "sglang.srt.speculative.spec_info:SpeculativeAlgorithm"),),
    "SpecInput": (("0.5.17", "sglang.srt.speculative.spec_info:SpecInput"),),
    "CustomSpecAlgo": (("0.5.17", "sglang.srt.speculative.spec_registry:CustomSpecAlgo"),),
    "get_spec": (("0.5.17", "sglang.srt.speculative.spec_registry:get_spec"),),
    "FutureMap": (("0.5.17", "sglang.srt.managers.overlap_utils:FutureMap"),),
    "ATTENTION_BACKENDS": (("0.5.17", "sglang.srt.layers.attention.attention_registry:ATTENTION_BACKENDS"),),
    "register_attention_backend": (
        ("0.5.17", "sglang.srt.layers.attention.attention_registry:register_attention_backend"),),
    "TritonAttnBackend": (("0.5.17", "sglang.srt.layers.attention.triton_backend:TritonAttnBackend"),),
    "logit_capping_mod": (("0.5.17", "sglang.srt.layers.attention.triton_backend:logit_capping_mod"),),
    "create_flashinfer_kv_indices_triton": (
        ("0.5.17", "sglang.kernels.ops.kvcache.kv_indices:create_flashinfer_kv_indices_triton"),
        ("0.5.23", "sglang.kernels.ops.attention.kv_indices:create_flashinfer_kv_indices_triton"),
    ),
    "assign_extend_cache_locs_func": (
        ("0.5.17", "sglang.kernels.ops.speculative.cache_locs:assign_extend_cache_locs_func"),),
    "ForwardMode": (("0.5.17", f"{_FBI}:ForwardMode"),),
    "ForwardBatch": (("0.5.17", f"{_FBI}:ForwardBatch"),),
    "ForwardContext": (("0.5.17", "sglang.srt.model_executor.forward_context:ForwardContext"),),
    "forward_context": (("0.5.17", "sglang.srt.model_executor.forward_context:forward_context"),),
    "DecodeCudaGraphRunner": (
        ("0.5.17", "sglang.srt.model_executor.runner.decode_cuda_graph_runner:DecodeCudaGraphRunner"),),
    "envs": (("0.5.17", "sglang.srt.environ:envs"),),
    "LogitsProcessorOutput": (("0.5.17", "sglang.srt.layers.logits_processor:LogitsProcessorOutput"),),
    "apply_scaling_penalties": (
        ("0.5.17", "sglang.srt.sampling.penaltylib.repetition_penalty:apply_scaling_penalties"),),
    "eagle_sample": (("0.5.17", "sglang.srt.speculative.eagle_utils:eagle_sample"),),
    "HookRegistry": (("0.5.17", "sglang.srt.plugins.hook_registry:HookRegistry"),),
    "HookType": (("0.5.17", "sglang.srt.plugins.hook_registry:HookType"),),
    "load_plugins": (("0.5.17", "sglang.srt.plugins:load_plugins"),),
    # The scheduler process's resolved configuration, as SGLang's own runtime reads it (the
    # ServerArgs record keeps the raw input from 0.5.19 on).
    "get_parallel": (("0.5.17", f"{_CTX}:get_parallel"),),
    # The tensor-parallel group (its CPU process group: adaptive speculation's choices)
    "get_tp_group": (("0.5.17", "sglang.srt.distributed.parallel_state:get_tp_group"),),
    "get_device": (("0.5.17", f"{_CTX}:get_device"),),
    "get_exec": (("0.5.17", f"{_CTX}:get_exec"),),
    "get_observability": (("0.5.17", f"{_CTX}:get_observability"),),
    "get_serving": (("0.5.17", f"{_CTX}:get_serving"),),
}

ADAPTERS = ("compute_spec_logprobs", "forward_context_of", "req_pool_row", "registered_hooks")


def registered_hooks(target: str) -> list[Any]:
    """The hooks SGLang's ``HookRegistry`` holds for the dotted ``target``: its class-level table
    ``_hooks`` (target -> [(hook type, hook, source)]) on every supported release; SGLang has no
    public reader of it."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    return [hook for _, hook, _ in HookRegistry._hooks.get(target, ())]


def req_pool_row(req: Any) -> int:
    """The request's row of ``req_to_token``: ``Req.req_pool_idx`` up to 0.5.18; from 0.5.19 the
    KV bookkeeping lives in ``Req.kv`` (``ReqKvInfo``)."""
    return req.kv.req_pool_idx if since("0.5.19") else req.req_pool_idx


def compute_spec_logprobs(batch: Any, logits_output: Any, predict: Any, accept_index: Any) -> None:
    """SGLang's logprobs of the accepted tokens of a verified chain (accept_index [B, k + 1]):
    ``compute_spec_v2_logprobs`` up to 0.5.17, ``compute_spec_logprobs`` (keyword-only index) after."""
    import sglang.srt.layers.logprob_processor as logprob_processor

    if since("0.5.18"):
        logprob_processor.compute_spec_logprobs(batch, logits_output, predict, accept_index=accept_index)
    else:
        logprob_processor.compute_spec_v2_logprobs(batch, logits_output, predict, accept_index,
                                                   accept_index.shape[1] - 1)


def forward_context_of(attn_backend: Any, forward_batch: Any) -> ContextManager[None]:
    """The forward context SGLang's model runner publishes around a forward of ``forward_batch``
    on ``attn_backend`` (``ModelRunner._forward_raw``): the backend alone up to 0.5.22; from 0.5.23
    ``forward_context`` also takes the batch, whose MoE token bound the context then carries."""
    # Runs around every draft replay: the package's names are resolved once, then kept.
    from sparsespec_sglang.compat import ForwardContext, forward_context

    ctx = ForwardContext(attn_backend=attn_backend)
    if since("0.5.23"):
        return forward_context(ctx, forward_batch=forward_batch)
    return forward_context(ctx)
