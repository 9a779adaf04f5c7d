"""SparseSpecConfig: every SPARSESPEC knob in one validated dataclass.

Values come from SGLang's own speculative flags where they exist (k is
``--speculative-num-steps``; ``--speculative-num-draft-tokens`` must be k+1 and
``--speculative-eagle-topk`` must be 1) and from ``--sparsespec-*`` flags (or the
same names as ``sglang.Engine`` keyword arguments) for the rest. Every bad value
raises :class:`SparseSpecArgsError` with one line naming the flag and the
allowed values, before any model is loaded.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from sparsespec_sglang.schedule import SCHEDULES as SCHEDULE_REGISTRY
from sparsespec_sglang.selection import AGGREGATIONS, PPM, recent_share_ppm

ALGORITHM_NAME = "SPARSESPEC"
# The project's own CPU tests run SPARSESPEC on SGLang's CPU engine (Triton kernels in the
# interpreter, a stand-in sgl_kernel): a test harness sets this in the environment of the
# processes it starts. For users a CPU is refused at startup, in one line.
CPU_TEST_ENV = "SPARSESPEC_CPU_TEST"


def allowed_device(device: Any) -> bool:
    """Whether SPARSESPEC may run on ``device``: CUDA, or a CPU under the project's test harness."""
    return device == "cuda" or (device == "cpu" and os.environ.get(CPU_TEST_ENV) == "1")


ATTENTION_BACKEND_NAME = "sparsespec"

# Decoder-only models whose attention is plain MHA/GQA over SGLang's
# MHATokenToKVPool (RadixAttention); the PillarAttn kernels assume that layout.
SUPPORTED_ARCHITECTURES = (
    "Qwen3ForCausalLM",
    "Qwen2ForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
)

# ServerArgs attribute holding the --sparsespec-* values (flags or Engine kwargs).
# A leading underscore keeps it out of SGLang's read-only field guard; it is a
# plain instance attribute, so it travels with server_args to scheduler processes.
SERVER_ARGS_ATTR = "_sparsespec_args"
# ServerArgs attribute holding the SparseSpecConfig a SPARSESPEC record resolved to: built once,
# just after SGLang resolved the record (validation.record_config), and read from there by the hooks
# on shared SGLang code (validation.sparsespec_config). Like SERVER_ARGS_ATTR, it travels with the
# record to the scheduler processes and lives as long as the record.
CONFIG_ATTR = "_sparsespec_config"


class SparseSpecArgsError(ValueError):
    """A bad SPARSESPEC setting; the message is one line naming the flag."""


@dataclass(frozen=True)
class Option:
    """One ``--sparsespec-*`` flag: its config field, parser and help text (``parse=bool``:
    a switch, set or unset, never given a value)."""

    field: Optional[str]  # None: not a SparseSpecConfig setting (KEEP_RETRACTED_KV below)
    flag: str
    parse: Callable[[str], Any]
    help: str
    store_false: bool = False  # a --sparsespec-disable-* switch: the field gets the negation

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# The one --sparsespec-* flag for servers that do NOT run SPARSESPEC. It rides the same parser,
# Engine-kwarg and SERVER_ARGS_ATTR plumbing as the rest, but it is no SparseSpecConfig field
# (a SPARSESPEC server already keeps retracted KV through kv_offload), so from_values skips it and
# check_keep_retracted_kv() below is its single validation, run just before SGLang resolves the
# server arguments (patches/server_args.py).
KEEP_RETRACTED_KV = Option(
    None, "--sparsespec-keep-retracted-kv", bool,
    "Keep a retracted request's KV in the hierarchical cache's host pool and resume it from there "
    "instead of recomputing it, on a server that does not run SPARSESPEC (SPARSESPEC servers do "
    "this by default; needs --enable-hierarchical-cache).")

OPTIONS = (
    Option("sparsity", "--sparsespec-sparsity", float,
           "Fraction s of the context each draft step attends to (1e-6 <= s <= 1, in steps of 1e-6)."),
    Option("min_selected", "--sparsespec-min-selected", int,
           "Floor on selected tokens per KV head (>= 0)."),
    Option("max_selected", "--sparsespec-max-selected", int,
           "Cap on selected tokens per KV head (>= min-selected, >= 1)."),
    Option("num_sink_tokens", "--sparsespec-sink-tokens", int,
           "First tokens of every request always attended by drafts (>= 0)."),
    Option("aggregation", "--sparsespec-aggregation", str,
           "How verify scores are pooled over queries and GQA heads: sum or max."),
    Option("selection", "--sparsespec-selection", str,
           "Which K tokens a draft step attends to: pillar (the K best by the last verify's "
           "attention scores), window (the K most recent) or hybrid:F (the round(F * K) most recent "
           "and the rest by score, F in [0, 1])."),
    Option("score_norm", "--sparsespec-score-norm", str,
           "Normaliser of the verify's selection scores: exact (each row's own lse; one more "
           "K read per verify) or draft (the draft step's sparse lse; fused into the verify pass)."),
    Option("schedule", "--sparsespec-schedule", str,
           "How drafts and verifies share forward passes: unified (the default; every pass mixes "
           "drafting and verifying requests, k + 1 passes per scheduler step) or lockstep (k draft "
           "passes over the whole batch, then one verify pass; the default with "
           "--enable-deterministic-inference, whose verify runs in lockstep only)."),
    Option("adaptive", "--sparsespec-adaptive", str,
           "Unified schedule only: on lets each request speculate or decode densely (a plain decode "
           "step of its own in every pass), chosen per step from its context length, its acceptance "
           "and the measured pass costs; off (the default) speculates every request."),
    Option("dense_backend", "--sparsespec-dense-backend", str,
           "With --sparsespec-adaptive on: the SGLang attention backend of a step whose requests all "
           "decode densely (plain decode forwards): triton (the default, the SPARSESPEC backend's own "
           "Triton decode) or flashinfer (a second backend instance, with its own CUDA graphs: pick "
           "the backend that decodes your model fastest in plain SGLang)."),
    Option("delayed_verification", "--sparsespec-disable-delayed-verify", bool,
           "Unified schedule only: make the host wait for every pass's verify results before "
           "launching the next pass (by default acceptance stays on the GPU and nothing waits).",
           store_false=True),
    Option("kv_offload", "--sparsespec-disable-kv-offload", bool,
           "Free a retracted request's KV and recompute it on re-admission (SGLang's default) "
           "instead of keeping it in the hierarchical cache's host pool (which needs "
           "--enable-hierarchical-cache).", store_false=True),
    Option("profile", "--sparsespec-profile", str,
           "Measurement for scripts/ (rank 0): every scheduler step synchronises at its end (exact "
           "accepted tokens per step and host time between steps; throughput drops), the phase means "
           "are written to this JSON path every 50 steps, and steps 100-102 are traced with "
           "torch.profiler into PATH.ops.txt and PATH.trace.json."),
    KEEP_RETRACTED_KV,
)

SCHEDULES = tuple(SCHEDULE_REGISTRY)  # the names of schedule.SCHEDULES, the default first
ADAPTIVE = ("on", "off")
DENSE_BACKENDS = ("triton", "flashinfer")
OPTIONS_BY_DEST = {o.dest: o for o in OPTIONS}
OPTIONS_BY_FIELD = {o.field: o for o in OPTIONS if o.field is not None}


@dataclass(frozen=True)
class SparseSpecConfig:
    """Validated SPARSESPEC settings (see README's flag table)."""

    num_draft_steps: int = 8
    sparsity: float = 0.05
    min_selected: int = 64
    max_selected: int = 2048
    num_sink_tokens: int = 4
    aggregation: str = "sum"
    selection: str = "pillar"
    score_norm: str = "exact"
    schedule: str = "unified"
    adaptive: str = "off"  # "on": per-request speculate-or-decode-densely (unified schedule)
    dense_backend: str = "triton"  # the attention backend of all-dense passes (adaptive on)
    delayed_verification: bool = True  # unified schedule: the host never waits on a verify
    kv_offload: bool = True  # retracted KV kept in the hierarchical cache (patches/retraction.py)
    profile: Optional[str] = None  # per-step profile path (profiling.CycleProfiler.configured)

    def __post_init__(self) -> None:
        _check(_is_int(self.num_draft_steps) and 1 <= self.num_draft_steps <= 32,
               "--speculative-num-steps", "an integer in [1, 32]", self.num_draft_steps)
        # Selection counts the sparsity in parts per million (sparsespec_sglang.selection).
        _check(_is_real(self.sparsity) and 1 <= round(self.sparsity * PPM) <= PPM,
               "--sparsespec-sparsity", f"a number in [{1 / PPM}, 1]", self.sparsity)
        _check(_is_int(self.min_selected) and self.min_selected >= 0,
               "--sparsespec-min-selected", "an integer >= 0", self.min_selected)
        _check(_is_int(self.max_selected) and self.max_selected >= max(1, self.min_selected),
               "--sparsespec-max-selected",
               f"an integer >= max(1, --sparsespec-min-selected={self.min_selected})",
               self.max_selected)
        _check(_is_int(self.num_sink_tokens) and self.num_sink_tokens >= 0,
               "--sparsespec-sink-tokens", "an integer >= 0", self.num_sink_tokens)
        _check(self.aggregation in AGGREGATIONS,
               "--sparsespec-aggregation", "one of: " + ", ".join(AGGREGATIONS), self.aggregation)
        _check(_is_selection(self.selection), "--sparsespec-selection",
               "pillar, window or hybrid:F with F in [0, 1]", self.selection)
        _check(self.score_norm in ("exact", "draft"),
               "--sparsespec-score-norm", "one of: exact, draft", self.score_norm)
        _check(isinstance(self.kv_offload, bool), "--sparsespec-disable-kv-offload", "set or unset",
               self.kv_offload)
        _check(self.profile is None or (isinstance(self.profile, str) and self.profile != ""),
               "--sparsespec-profile", "a file path", self.profile)
        _check(self.schedule in SCHEDULES, "--sparsespec-schedule", "one of: " + ", ".join(SCHEDULES),
               self.schedule)
        _check(self.adaptive in ADAPTIVE, "--sparsespec-adaptive", "one of: " + ", ".join(ADAPTIVE),
               self.adaptive)
        _check(self.adaptive == "off" or self.schedule == "unified", "--sparsespec-adaptive",
               "off with --sparsespec-schedule lockstep (dense rows are rows of unified passes)",
               self.adaptive)
        _check(self.dense_backend in DENSE_BACKENDS, "--sparsespec-dense-backend",
               "one of: " + ", ".join(DENSE_BACKENDS), self.dense_backend)
        _check(self.dense_backend == "triton" or self.adaptive == "on", "--sparsespec-dense-backend",
               "triton unless --sparsespec-adaptive on (only adaptive speculation runs all-dense passes)",
               self.dense_backend)
        _check(isinstance(self.delayed_verification, bool)
               and (self.delayed_verification or self.schedule == "unified"),
               "--sparsespec-disable-delayed-verify",
               "used with --sparsespec-schedule unified only (lockstep verifies once per step)",
               "set")

    @classmethod
    def from_values(cls, num_draft_steps: int | None, values: Mapping[str, Any]) -> "SparseSpecConfig":
        """Build from k and a ``{dest: value}`` mapping of ``--sparsespec-*`` values."""
        kwargs: dict[str, Any] = {}
        if num_draft_steps is not None:
            kwargs["num_draft_steps"] = num_draft_steps
        for dest, value in values.items():
            option = OPTIONS_BY_DEST.get(dest)
            if option is None:
                allowed = ", ".join(sorted(OPTIONS_BY_DEST))
                raise SparseSpecArgsError(f"unknown SPARSESPEC option {dest!r}; allowed: {allowed}")
            if value is None or option.field is None:  # field None: check_keep_retracted_kv validates it
                continue
            kwargs[option.field] = (not value) if option.store_false else value
        return cls(**kwargs)


def check_keep_retracted_kv(value: Any, *, sparsespec: bool, hierarchical_cache: bool) -> bool:
    """Validate ``--sparsespec-keep-retracted-kv`` (None/False: unset) for a server; True if set."""
    flag = KEEP_RETRACTED_KV.flag
    if value is None or value is False:
        return False
    if value is not True:
        raise SparseSpecArgsError(f"{flag} must be set or unset (True or False; got {value!r})")
    if sparsespec:
        raise SparseSpecArgsError(
            f"{ALGORITHM_NAME}: {flag} is for servers without --speculative-algorithm {ALGORITHM_NAME}; "
            f"{ALGORITHM_NAME} keeps a retracted request's KV in the hierarchical cache by default "
            "(--sparsespec-disable-kv-offload turns it off)")
    if not hierarchical_cache:
        raise SparseSpecArgsError(
            f"{flag} needs --enable-hierarchical-cache (its host pool is where the retracted "
            "request's KV is kept)")
    return True


def _is_selection(v: Any) -> bool:
    try:
        recent_share_ppm(v)
    except ValueError:
        return False
    return isinstance(v, str)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, flag: str, allowed: str, got: Any) -> None:
    if not ok:
        raise SparseSpecArgsError(f"{ALGORITHM_NAME}: {flag} must be {allowed} (got {got!r})")
