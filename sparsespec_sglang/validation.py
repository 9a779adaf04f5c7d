"""Validate and default SGLang's ServerArgs for --speculative-algorithm SPARSESPEC.

SGLang calls :func:`validate_server_args` from ``handle_speculative_decoding``
while it resolves the server arguments (``ServerArgs.__post_init__`` up to 0.5.18,
``ServerArgs.resolve_once`` after), i.e. before any model weights load, so a
bad setting stops the launch with one line instead of failing deep in the
scheduler process. :func:`select_attention_backend` runs just before that
resolution, on the user's own values; :func:`record_config` just after it.
"""

from __future__ import annotations

from typing import Any, Optional

from sparsespec_sglang.config import (
    ALGORITHM_NAME,
    ATTENTION_BACKEND_NAME,
    CONFIG_ATTR,
    KEEP_RETRACTED_KV,
    OPTIONS_BY_FIELD,
    SERVER_ARGS_ATTR,
    SUPPORTED_ARCHITECTURES,
    SparseSpecArgsError,
    SparseSpecConfig,
    allowed_device,
)


DEFAULT_MAX_RUNNING_REQUESTS = 128
SCHEDULE_DEST = OPTIONS_BY_FIELD["schedule"].dest


def is_sparsespec(server_args: Any) -> bool:
    return (getattr(server_args, "speculative_algorithm", None) or "").upper() == ALGORITHM_NAME


def sparsespec_config(server_args: Any) -> Optional[SparseSpecConfig]:
    """This server's SPARSESPEC settings, or None for any other server (hooks on shared SGLang
    code ask this on every call): the config :func:`record_config` attached to the record when
    SGLang resolved it, never rebuilt here."""
    if server_args is None or not is_sparsespec(server_args):
        return None
    return getattr(server_args, CONFIG_ATTR)


def keep_retracted_kv_flag(server_args: Any) -> bool:
    """Whether ``--sparsespec-keep-retracted-kv`` is set on this server (validated at startup:
    only servers without SPARSESPEC, with --enable-hierarchical-cache, get it set)."""
    values = getattr(server_args, SERVER_ARGS_ATTR, None) or {}
    return values.get(KEEP_RETRACTED_KV.dest) is True


def _fail(flag: str, allowed: str, got: Any) -> None:
    raise SparseSpecArgsError(f"{ALGORITHM_NAME}: {flag} must be {allowed} (got {got!r})")


def _values(cfg: Any) -> dict:
    """The ``--sparsespec-*`` values of resolved settings ``cfg``, with the schedule they imply:
    the deterministic verify (one SGLang decode per verify token) runs in lockstep, so that is the
    default schedule under --enable-deterministic-inference (which SGLang also turns on for
    --rl-on-policy-target while it resolves); an explicit unified is refused there."""
    values = dict(getattr(cfg, SERVER_ARGS_ATTR, None) or {})
    if getattr(cfg, "enable_deterministic_inference", False) and values.get(SCHEDULE_DEST) is None:
        values[SCHEDULE_DEST] = "lockstep"
    return values


def record_config(server_args: Any) -> None:
    """After SGLang resolved a SPARSESPEC record: keep on it the schedule its settings imply and
    the :class:`SparseSpecConfig` they make (``CONFIG_ATTR``), built this once per record; both
    travel with it to the scheduler processes (the worker, :func:`sparsespec_config`)."""
    from sparsespec_sglang.compat import resolved_view

    resolved = resolved_view(server_args)
    values = _values(resolved)
    setattr(server_args, SERVER_ARGS_ATTR, values)
    setattr(server_args, CONFIG_ATTR, SparseSpecConfig.from_values(resolved.speculative_num_steps, values))


def check_flag_values(cfg: Any) -> SparseSpecConfig:
    """The checks that need nothing but the flag values: the ``--sparsespec-*`` values, the
    speculative flags SPARSESPEC fixes, and the combinations with --enable-deterministic-inference.

    ``cfg`` is the user's own record (run before anything about the machine is checked, so a bad
    value is named even on a machine SPARSESPEC cannot run on) or the settings SGLang resolved
    (:func:`validate_server_args`, where options SGLang turned on are seen too).
    """
    deterministic = bool(getattr(cfg, "enable_deterministic_inference", False))
    config = SparseSpecConfig.from_values(getattr(cfg, "speculative_num_steps", None), _values(cfg))
    k = config.num_draft_steps
    topk = getattr(cfg, "speculative_eagle_topk", None)
    if topk not in (None, 1):
        _fail("--speculative-eagle-topk", "1 (SPARSESPEC drafts one chain)", topk)
    draft_tokens = getattr(cfg, "speculative_num_draft_tokens", None)
    if draft_tokens not in (None, k + 1):
        _fail("--speculative-num-draft-tokens", f"--speculative-num-steps + 1 = {k + 1}", draft_tokens)
    draft_model = getattr(cfg, "speculative_draft_model_path", None)
    if draft_model is not None:
        _fail("--speculative-draft-model-path", "unset (SPARSESPEC drafts with the target model)", draft_model)
    for flag in ("speculative_accept_threshold_single", "speculative_accept_threshold_acc"):
        # SGLang's speculative sampling loosens acceptance below 1.0: the output would no longer
        # follow the target distribution, and SPARSESPEC promises exactly the model's.
        value = getattr(cfg, flag, None)  # None: not given (a record before resolution)
        if value not in (None, 1.0):
            _fail("--" + flag.replace("_", "-"), "1.0 (a lower threshold accepts drafts the model would "
                  "not sample: lossy)", value)
    if config.score_norm == "draft" and deterministic:
        # The deterministic verify (one SGLang decode per verify token) has its own exact row
        # lse and scores from it; a draft-normalised request could only be ignored.
        _fail("--sparsespec-score-norm", "exact with --enable-deterministic-inference", "draft")
    if config.schedule == "unified" and deterministic:
        # A unified pass runs the verify kernel; the deterministic verify is lockstep-only.
        _fail("--sparsespec-schedule", "lockstep with --enable-deterministic-inference", "unified")
    return config


def check_device(device: Any) -> None:
    """Refuse a device SPARSESPEC does not run on (any but CUDA, outside the project's CPU test mode)."""
    if not allowed_device(device):
        _fail("--device", "cuda (SPARSESPEC's kernels run on CUDA GPUs)", device)


def validate_server_args(server_args: Any) -> SparseSpecConfig:
    """Check every SPARSESPEC constraint and fill SGLang's speculative fields.

    ``server_args`` is what SGLang hands a registered algorithm mid-resolution (the record, or
    from 0.5.20 a stand-in that declares what is written on it); it is read through
    ``compat.resolving``, which sees what SGLang has decided so far. Writes fill SGLang's fields:
    k defaults to 8, num_draft_tokens to k+1, topk to 1, max_running_requests to 128, and mixed
    chunked prefill is turned off (verify passes are not mixed with prefill chunks).
    """
    from sparsespec_sglang.compat import attention_backends_of, dp_attention, model_config_of, resolving

    cfg = resolving(server_args)
    config = check_flag_values(cfg)
    k = config.num_draft_steps

    if cfg.pp_size != 1:
        _fail("--pp-size", "1 (pipeline parallelism is not supported)", cfg.pp_size)
    for field, what in (("attn_cp_size", "attention context parallelism"),
                        ("dcp_size", "decode context parallelism")):
        # Context parallelism splits a request's KV along the sequence (dcp) or shards attention
        # heads differently from the KV pool (attn-cp); PillarAttn's top-K and draft kernels read
        # a request's whole context for each KV head on one rank.
        value = getattr(cfg, field, 1) or 1
        if value != 1:
            _fail("--" + field.replace("_", "-"), f"1 ({what} is not supported)", value)
    dp = dp_attention(cfg)
    if dp is not None:
        flag, off, got = dp
        _fail(flag, f"{off} (DP attention is not supported)", got)
    if cfg.disaggregation_mode != "null":
        # A decode-only server gets requests whose prefill ran elsewhere: the worker's
        # per-request state (selection window, pending token) is set up by its own prefill.
        _fail("--disaggregation-mode", "null (PD disaggregation is not supported)", cfg.disaggregation_mode)
    for field in ("enable_page_major_kv_layout", "enable_unified_memory"):
        if getattr(cfg, field, False):
            # PillarAttn's kernels read the per-layer KV pool at the slot ids of req_to_token; these
            # layouts page the pool differently (and translate the ids).
            _fail("--" + field.replace("_", "-"), "off (PillarAttn reads the per-layer KV pool)", True)
    if cfg.kv_cache_dtype not in ("auto", "bfloat16", "float16"):
        _fail("--kv-cache-dtype", "auto, bfloat16 or float16", cfg.kv_cache_dtype)
    check_device(cfg.device)
    if cfg.device == "cuda":
        # Another option (e.g. deterministic inference) may have swapped the backend.
        for backend in attention_backends_of(cfg):
            if backend != ATTENTION_BACKEND_NAME:
                _fail("--attention-backend", f"{ATTENTION_BACKEND_NAME} (another option selected "
                      "a different backend)", backend)

    archs = list(getattr(model_config_of(server_args).hf_config, "architectures", None) or [])
    if not archs or archs[0] not in SUPPORTED_ARCHITECTURES:
        _fail("--model-path", "a decoder-only model with architecture in "
              + ", ".join(SUPPORTED_ARCHITECTURES), archs[0] if archs else None)

    if cfg.max_running_requests is None:
        # Selection tables and score buffers are sized per request-pool row.
        server_args.max_running_requests = DEFAULT_MAX_RUNNING_REQUESTS
    server_args.speculative_num_steps = k
    server_args.speculative_num_draft_tokens = k + 1
    server_args.speculative_eagle_topk = 1
    server_args.enable_mixed_chunk = False
    return config


def select_attention_backend(server_args: Any) -> None:
    """Refuse any other attention backend the user asked for, else pick the plugin's.

    Runs on the user's own values, just before SGLang resolves them (its device
    handlers and auto-selection would fill the field in).
    """
    for flag, value in (
        ("--attention-backend", server_args.attention_backend),
        ("--decode-attention-backend", server_args.decode_attention_backend),
        ("--prefill-attention-backend", server_args.prefill_attention_backend),
    ):
        if value not in (None, ATTENTION_BACKEND_NAME):
            _fail(flag, f"{ATTENTION_BACKEND_NAME} or unset", value)
    from sparsespec_sglang.compat import declare

    declare(server_args, "sparsespec_sglang.select_attention_backend", attention_backend=ATTENTION_BACKEND_NAME)
