"""Stock SGLang (0.5.17 to 0.5.23) finds SPARSESPEC through the entry point and validates its args."""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from sparsespec_sglang import compat
from sparsespec_sglang.config import SERVER_ARGS_ATTR, SparseSpecArgsError, SparseSpecConfig
from sparsespec_sglang.validation import sparsespec_config


@pytest.fixture(scope="module")
def sglang_loaded():
    from sglang.srt.plugins import load_plugins

    load_plugins()


def _model_dir(root: Path, architecture: str, **extra) -> str:
    config = {
        "architectures": [architecture], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False, **extra,
    }
    path = root / architecture
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return _model_dir(tmp_path_factory.mktemp("models"), "Qwen3ForCausalLM")


def _server_args(model_dir: str, **kwargs):
    """A resolved ServerArgs (SPARSESPEC unless told) on CPU; ``sparsespec_*`` keywords taken as
    ``sglang.Engine`` takes them. Read resolved values through ``compat.resolved_view``: from
    SGLang 0.5.19 the record's fields keep the raw input."""
    from sparsespec_sglang.patches.server_args import new_server_args

    sa = new_server_args(model_path=model_dir, device="cpu", skip_tokenizer_init=True,
                         speculative_algorithm=kwargs.pop("speculative_algorithm", "SPARSESPEC"),
                         **kwargs)
    compat.resolve_server_args(sa)
    return sa


def _resolved(sa):
    return compat.resolved_view(sa)


LIGHT_IMPORT = """
import sys
from importlib.metadata import entry_points
ep, = [e for e in entry_points(group="sglang.srt.plugins") if e.name == "sparsespec"]
ep.load()
import sparsespec_sglang.config, sparsespec_sglang.selection, sparsespec_sglang.validation
print(sorted(m for m in ("torch", "triton", "sglang") if m in sys.modules))
"""


def test_entry_module_loads_neither_torch_nor_triton():
    """Loading the entry point (what SGLang's load_plugins does before it calls register) and the
    configuration checks import neither torch nor Triton; register() itself imports SGLang's
    registries, and with them torch."""
    out = subprocess.run([sys.executable, "-c", LIGHT_IMPORT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_entry_point_declared():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("sparsespec") == "sparsespec_sglang.plugin:register"


@pytest.mark.parametrize("name", ["SPARSESPEC", "sparsespec", "SparseSpec"])
def test_from_string_resolves(sglang_loaded, name):
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sparsespec_sglang.algorithm import SparseSpecAlgo

    algo = SpeculativeAlgorithm.from_string(name)
    assert isinstance(algo, SparseSpecAlgo)
    assert algo.name == "SPARSESPEC" and algo.supports_overlap and algo.is_ngram() and not algo.has_draft_kv()


def test_spec_class_has_every_method_the_enum_has(sglang_loaded):
    """The scheduler calls these on any algorithm; CustomSpecAlgo misses some."""
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sparsespec_sglang.algorithm import SparseSpecAlgo

    enum_methods = {n for n, v in vars(SpeculativeAlgorithm).items()
                    if callable(v) and not n.startswith("_") and n not in ("register", "from_string")}
    assert enum_methods - set(dir(SparseSpecAlgo)) == set()


def test_server_args_defaults(sglang_loaded, model_dir):
    sa = _server_args(model_dir)
    cfg = _resolved(sa)
    assert cfg.speculative_algorithm == "SPARSESPEC"
    assert (cfg.speculative_num_steps, cfg.speculative_num_draft_tokens, cfg.speculative_eagle_topk) == (8, 9, 1)
    assert cfg.attention_backend == "sparsespec"
    assert (cfg.max_running_requests, cfg.enable_mixed_chunk) == (128, False)
    assert sparsespec_config(sa) == SparseSpecConfig()
    assert sparsespec_config(pickle.loads(pickle.dumps(sa))) == SparseSpecConfig()


def test_server_args_values_flow_into_config(sglang_loaded, model_dir):
    sa = _server_args(model_dir, speculative_num_steps=4, sparsespec_sparsity=0.1,
                      sparsespec_aggregation="max", sparsespec_score_norm="draft")
    assert (_resolved(sa).speculative_num_steps, _resolved(sa).speculative_num_draft_tokens) == (4, 5)
    config = sparsespec_config(pickle.loads(pickle.dumps(sa)))
    assert (config.num_draft_steps, config.sparsity, config.aggregation) == (4, 0.1, "max")
    assert config.delayed_verification is True and config.schedule == "unified"
    assert config.score_norm == "draft"
    config = sparsespec_config(_server_args(
        model_dir, sparsespec_schedule="unified", sparsespec_disable_delayed_verify=True))
    assert config.schedule == "unified" and config.delayed_verification is False
    assert config.adaptive == "off"  # until GPU measurements say otherwise
    config = sparsespec_config(pickle.loads(pickle.dumps(_server_args(
        model_dir, sparsespec_adaptive="on"))))
    assert config.adaptive == "on" and config.schedule == "unified" and config.dense_backend == "triton"
    config = sparsespec_config(pickle.loads(pickle.dumps(_server_args(
        model_dir, sparsespec_adaptive="on", sparsespec_dense_backend="flashinfer"))))
    assert config.dense_backend == "flashinfer"


def test_the_config_is_built_once_per_record_and_travels_with_it(sglang_loaded, model_dir):
    """The hooks on shared SGLang code read the SparseSpecConfig resolution attached to the record
    (never rebuilt per call), in the scheduler's copy too; any other server has none."""
    sa = _server_args(model_dir, speculative_num_steps=4, sparsespec_sparsity=0.25,
                      sparsespec_profile="/tmp/p.json")
    config = sparsespec_config(sa)
    assert config == SparseSpecConfig.from_values(4, getattr(sa, SERVER_ARGS_ATTR))
    assert (config.num_draft_steps, config.sparsity, config.profile) == (4, 0.25, "/tmp/p.json")
    assert sparsespec_config(sa) is config
    assert sparsespec_config(pickle.loads(pickle.dumps(sa))) == config
    assert sparsespec_config(_server_args(model_dir, enable_deterministic_inference=True)).schedule == "lockstep"
    assert sparsespec_config(_server_args(model_dir, speculative_algorithm=None)) is None


def test_registering_again_never_stacks_a_hook(sglang_loaded):
    """SGLang's HookRegistry is the one record of what the plugin registered: a second
    ``register()`` (repeated ``load_plugins`` / tests) adds nothing."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from sparsespec_sglang import plugin
    from sparsespec_sglang.compat import hook_target, registered_hooks
    from sparsespec_sglang.patches import retraction
    from sparsespec_sglang.patches import server_args as server_args_patch

    plugin.register()
    plugin.register()
    for name, hook, hook_type in (*retraction.HOOKS, *server_args_patch.hooks()):
        target = hook_target(name)
        assert registered_hooks(target).count(hook) == 1, name
        # SGLang's table, as registered_hooks reads it: target -> [(hook type, hook, source)].
        assert (hook_type, hook) in [(t, h) for t, h, _ in HookRegistry._hooks[target]]
        assert isinstance(hook_type, HookType)


def test_deterministic_inference_keeps_the_sparsespec_backend(sglang_loaded, model_dir):
    sa = _server_args(model_dir, enable_deterministic_inference=True)
    assert _resolved(sa).attention_backend == "sparsespec" and _resolved(sa).enable_deterministic_inference
    # its verify runs in lockstep: the default schedule there, kept in the scheduler's copy
    assert sparsespec_config(pickle.loads(pickle.dumps(sa))).schedule == "lockstep"
    assert sparsespec_config(_server_args(model_dir)).schedule == "unified"


def test_deterministic_inference_sglang_turns_on_makes_the_schedule_lockstep(sglang_loaded, model_dir,
                                                                            monkeypatch):
    """SGLang turns deterministic inference on for --rl-on-policy-target while it resolves: the
    default schedule follows the resolved setting, on the record the scheduler processes get."""
    for name in ("SGLANG_ENABLE_DETERMINISTIC_INFERENCE", "SGLANG_VLM_CACHE_SIZE_MB"):
        monkeypatch.delenv(name, raising=False)  # resolution sets them; restored after the test
    sa = _server_args(model_dir, rl_on_policy_target="fsdp")
    assert _resolved(sa).enable_deterministic_inference
    assert sparsespec_config(pickle.loads(pickle.dumps(sa))).schedule == "lockstep"


@pytest.mark.parametrize("kwargs, flag", [
    (dict(speculative_num_steps=0), "--speculative-num-steps"),
    (dict(speculative_eagle_topk=4), "--speculative-eagle-topk"),
    (dict(speculative_num_steps=4, speculative_num_draft_tokens=8), "--speculative-num-draft-tokens"),
    (dict(sparsespec_sparsity=0.0), "--sparsespec-sparsity"),
    (dict(sparsespec_sparsity=1.5), "--sparsespec-sparsity"),
    (dict(sparsespec_min_selected=-1), "--sparsespec-min-selected"),
    (dict(sparsespec_min_selected=100, sparsespec_max_selected=10), "--sparsespec-max-selected"),
    (dict(sparsespec_sink_tokens=-2), "--sparsespec-sink-tokens"),
    (dict(sparsespec_aggregation="mean"), "--sparsespec-aggregation"),
    (dict(sparsespec_score_norm="approx"), "--sparsespec-score-norm"),
    (dict(sparsespec_score_norm="draft", enable_deterministic_inference=True),
     "--sparsespec-score-norm must be exact with --enable-deterministic-inference"),
    (dict(sparsespec_sparsity=4e-7), "--sparsespec-sparsity must be a number in [1e-06, 1]"),
    (dict(sparsespec_schedule="lockstep", sparsespec_disable_delayed_verify=True),
     "--sparsespec-disable-delayed-verify must be used with --sparsespec-schedule unified only"),
    (dict(sparsespec_disable_delayed_verify=True, enable_deterministic_inference=True),
     "--sparsespec-disable-delayed-verify must be used with --sparsespec-schedule unified only"),
    (dict(sparsespec_schedule="mixed"), "--sparsespec-schedule must be one of: unified, lockstep"),
    (dict(sparsespec_adaptive="auto"), "--sparsespec-adaptive must be one of: on, off (got 'auto')"),
    (dict(sparsespec_adaptive=True), "--sparsespec-adaptive must be one of: on, off (got True)"),
    (dict(sparsespec_schedule="lockstep", sparsespec_adaptive="on"),
     "--sparsespec-adaptive must be off with --sparsespec-schedule lockstep"),
    (dict(sparsespec_adaptive="on", enable_deterministic_inference=True),
     "--sparsespec-adaptive must be off with --sparsespec-schedule lockstep"),
    (dict(sparsespec_adaptive="on", sparsespec_dense_backend="fa4"),
     "--sparsespec-dense-backend must be one of: triton, flashinfer (got 'fa4')"),
    (dict(sparsespec_dense_backend="flashinfer"),
     "--sparsespec-dense-backend must be triton unless --sparsespec-adaptive on"),
    (dict(sparsespec_schedule="unified", enable_deterministic_inference=True),
     "--sparsespec-schedule must be lockstep with --enable-deterministic-inference"),
    (dict(attention_backend="triton"), "--attention-backend"),
    (dict(decode_attention_backend="flashinfer"), "--decode-attention-backend"),
    (dict(pp_size=2), "--pp-size"),
    (dict(attn_cp_size=2, tp_size=2), "--attn-cp-size must be 1 (attention context parallelism is not supported)"),
    (dict(dcp_size=2, tp_size=2), "--dcp-size must be 1 (decode context parallelism is not supported)"),
    (dict(speculative_accept_threshold_single=0.5), "--speculative-accept-threshold-single must be 1.0"),
    (dict(speculative_accept_threshold_acc=0.9), "--speculative-accept-threshold-acc must be 1.0"),
    (dict(enable_page_major_kv_layout=True), "--enable-page-major-kv-layout must be off"),
    # From 0.5.22 resolution turns the deprecated --enable-dp-attention into --attn-dp-size.
    (dict(enable_dp_attention=True, dp_size=2, tp_size=2),
     "--attn-dp-size must be 1 (DP attention is not supported) (got 2)" if compat.since("0.5.22")
     else "--enable-dp-attention must be off (DP attention is not supported) (got True)"),
    (dict(disaggregation_mode="decode"), "--disaggregation-mode"),
    (dict(speculative_draft_model_path="SELF"), "--speculative-draft-model-path"),
    (dict(sparsespec_bogus=1), "sparsespec_bogus"),
    (dict(sparsespec_offload_low_watermark=0.1), "unknown keyword argument 'sparsespec_offload_low_watermark'"),
])
def test_bad_values_rejected_with_one_line(sglang_loaded, model_dir, kwargs, flag):
    kwargs = {k: model_dir if v == "SELF" else v for k, v in kwargs.items()}
    with pytest.raises(SparseSpecArgsError) as err:
        _server_args(model_dir, **kwargs)
    message = str(err.value)
    assert flag in message and "\n" not in message


def test_adaptive_speculation_runs_under_tensor_parallelism(sglang_loaded, model_dir):
    """--sparsespec-adaptive on with --tp-size 2 resolves: the group's first rank chooses the modes
    and the others take them (schedule.TPGroup)."""
    config = sparsespec_config(_server_args(model_dir, sparsespec_adaptive="on", tp_size=2))
    assert config.adaptive == "on" and config.schedule == "unified"


@pytest.mark.parametrize("arch", ["BertModel", "Qwen3MoeForCausalLM"])
def test_unsupported_model_rejected(sglang_loaded, tmp_path, arch):
    with pytest.raises(SparseSpecArgsError, match="--model-path .*Qwen3ForCausalLM"):
        _server_args(_model_dir(tmp_path, arch))


def test_sparsespec_flags_need_the_algorithm(sglang_loaded, model_dir):
    with pytest.raises(SparseSpecArgsError, match="--sparsespec-sparsity need --speculative-algorithm"):
        _server_args(model_dir, speculative_algorithm=None, sparsespec_sparsity=0.1)
    assert _server_args(model_dir, speculative_algorithm=None).speculative_algorithm is None


@pytest.mark.parametrize("algorithm", [None, "NGRAM", "EAGLE"])
def test_keep_retracted_kv_flag_for_servers_without_sparsespec(sglang_loaded, model_dir, algorithm):
    """The Engine-kwarg path: allowed without SPARSESPEC, with HiCache; travels with server_args."""
    from sparsespec_sglang.validation import keep_retracted_kv_flag

    sa = _server_args(model_dir, speculative_algorithm=algorithm, enable_hierarchical_cache=True,
                      sparsespec_keep_retracted_kv=True)
    sa = pickle.loads(pickle.dumps(sa))  # as the scheduler processes get it
    assert getattr(sa, SERVER_ARGS_ATTR) == {"sparsespec_keep_retracted_kv": True}
    assert keep_retracted_kv_flag(sa)
    sa = _server_args(model_dir, speculative_algorithm=algorithm, enable_hierarchical_cache=True)
    assert not keep_retracted_kv_flag(sa)
    # Not a SparseSpecConfig setting: from_values skips it (and still refuses unknown names).
    assert SparseSpecConfig.from_values(None, {"sparsespec_keep_retracted_kv": True}) == SparseSpecConfig()
    with pytest.raises(SparseSpecArgsError, match="unknown SPARSESPEC option 'sparsespec_keep_kv'"):
        SparseSpecConfig.from_values(None, {"sparsespec_keep_kv": True})


def test_keep_retracted_kv_cli_flag_parses(sglang_loaded, model_dir):
    import argparse

    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    base = ["--model-path", model_dir, "--device", "cpu", "--skip-tokenizer-init"]
    sa = ServerArgs.from_cli_args(parser.parse_args(
        base + ["--enable-hierarchical-cache", "--sparsespec-keep-retracted-kv"]))
    compat.resolve_server_args(sa)
    assert getattr(sa, SERVER_ARGS_ATTR) == {"sparsespec_keep_retracted_kv": True}
    assert sa.enable_hierarchical_cache and sa.speculative_algorithm is None
    assert getattr(ServerArgs.from_cli_args(parser.parse_args(base)), SERVER_ARGS_ATTR) == {}
    with pytest.raises(SystemExit):  # a switch: it takes no value
        parser.parse_args(base + ["--sparsespec-keep-retracted-kv", "true"])


KEEP_KV_NEEDS_HICACHE = ("--sparsespec-keep-retracted-kv needs --enable-hierarchical-cache "
                         "(its host pool is where the retracted request's KV is kept)")
KEEP_KV_ON_SPARSESPEC = (
    "SPARSESPEC: --sparsespec-keep-retracted-kv is for servers without --speculative-algorithm "
    "SPARSESPEC; SPARSESPEC keeps a retracted request's KV in the hierarchical cache by default "
    "(--sparsespec-disable-kv-offload turns it off)")


@pytest.mark.parametrize("kwargs, message", [
    (dict(speculative_algorithm=None), KEEP_KV_NEEDS_HICACHE),
    (dict(speculative_algorithm="NGRAM"), KEEP_KV_NEEDS_HICACHE),
    (dict(enable_hierarchical_cache=True), KEEP_KV_ON_SPARSESPEC),
    (dict(), KEEP_KV_ON_SPARSESPEC),
    # Every other --sparsespec-* flag still needs SPARSESPEC, and only it is named.
    (dict(speculative_algorithm=None, enable_hierarchical_cache=True, sparsespec_sparsity=0.1),
     "--sparsespec-sparsity need --speculative-algorithm SPARSESPEC (got None)"),
    (dict(speculative_algorithm=None, enable_hierarchical_cache=True,
          sparsespec_keep_retracted_kv="yes"),
     "--sparsespec-keep-retracted-kv must be set or unset (True or False; got 'yes')"),
])
def test_keep_retracted_kv_refused_with_one_line(sglang_loaded, model_dir, kwargs, message):
    kwargs = {"sparsespec_keep_retracted_kv": True, **kwargs}
    with pytest.raises(SparseSpecArgsError) as err:
        _server_args(model_dir, **kwargs)
    assert str(err.value) == message


def test_keep_retracted_kv_false_is_unset(sglang_loaded, model_dir):
    """``sparsespec_keep_retracted_kv=False`` (an Engine kwarg) asks for nothing: no error anywhere."""
    from sparsespec_sglang.validation import keep_retracted_kv_flag

    assert not keep_retracted_kv_flag(_server_args(model_dir, sparsespec_keep_retracted_kv=False))
    assert not keep_retracted_kv_flag(_server_args(model_dir, speculative_algorithm=None,
                                                   sparsespec_keep_retracted_kv=False))


def test_server_args_constructor_keywords(sglang_loaded, model_dir):
    """Up to 0.5.19 ``ServerArgs(...)`` itself takes ``sparsespec_*`` keywords (its ``__init__`` is
    hooked); from 0.5.20 its construction is msgspec's C code, which refuses them before any hook,
    so ``new_server_args`` (and ``sglang.Engine``) take them instead."""
    from sglang.srt.server_args import ServerArgs

    kwargs = dict(model_path=model_dir, device="cpu", skip_tokenizer_init=True,
                  speculative_algorithm="SPARSESPEC", sparsespec_sparsity=0.25)
    if compat.init_takes_keywords():
        sa = ServerArgs(**kwargs)
        compat.resolve_server_args(sa)
        assert sparsespec_config(sa).sparsity == 0.25
    else:
        with pytest.raises(TypeError, match="Unexpected keyword argument 'sparsespec_sparsity'"):
            ServerArgs(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsespec_sparsity=0.1),
     "--sparsespec-sparsity need --speculative-algorithm SPARSESPEC (got None)"),
    (dict(speculative_algorithm="SPARSESPEC", sparsespec_sparsity=0.0),
     "SPARSESPEC: --sparsespec-sparsity must be a number in [1e-06, 1] (got 0.0)"),
    (dict(sparsespec_sparsty=0.1), "SPARSESPEC: unknown keyword argument 'sparsespec_sparsty'"),
])
def test_engine_keywords_reach_the_checks(sglang_loaded, model_dir, monkeypatch, kwargs, message):
    """``sglang.Engine(sparsespec_*=...)``: the values reach the checks, which stop it before
    anything is launched."""
    import atexit

    from sglang.srt.entrypoints import engine as engine_module

    def launch(server_args):  # the first step after resolution: must not be reached
        raise AssertionError("sglang.Engine got past resolving its arguments")

    monkeypatch.setattr(engine_module, "_set_envs_and_config", launch)
    monkeypatch.setattr(engine_module, "configure_logger", lambda *args, **kwargs: None)  # process-wide
    engine = engine_module.Engine.__new__(engine_module.Engine)
    try:
        with pytest.raises(SparseSpecArgsError) as err:
            engine.__init__(model_path=model_dir, device="cpu", skip_tokenizer_init=True, **kwargs)
    finally:
        atexit.unregister(engine.shutdown)  # registered before the record is resolved (0.5.20+)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "server_args_class" not in vars(engine)  # the hook's builder is gone again


def test_worker_refuses_cpu_outside_the_test_mode(sglang_loaded, model_dir, monkeypatch):
    from sglang.srt.runtime_context import get_context
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from sparsespec_sglang.config import CPU_TEST_ENV
    from sparsespec_sglang.worker import SparseSpecWorker

    sa = _server_args(model_dir)  # validated in the test mode
    monkeypatch.delenv(CPU_TEST_ENV)
    # As in a scheduler process, where the resolved configuration is published.
    with get_context().override_server_args(device=_resolved(sa).device):
        with pytest.raises(SparseSpecArgsError, match="CUDA GPUs only"):
            SpeculativeAlgorithm.from_string("SPARSESPEC").create_worker(sa)
        monkeypatch.setenv(CPU_TEST_ENV, "1")
        assert SpeculativeAlgorithm.from_string("SPARSESPEC").create_worker(sa) is SparseSpecWorker


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_cli_flags_parse_and_bad_value_is_one_line(model_dir):
    proc = _launch("--model-path", model_dir, "--device", "cpu", "--speculative-algorithm",
                   "sparsespec", "--sparsespec-sparsity", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: SPARSESPEC: --sparsespec-sparsity must be a number in [1e-06, 1] (got 0.0)")


def test_keep_retracted_kv_without_hicache_is_one_line(model_dir):
    proc = _launch("--model-path", model_dir, "--device", "cpu", "--sparsespec-keep-retracted-kv")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: " + KEEP_KV_NEEDS_HICACHE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_launch_without_gpu_is_one_line(model_dir):
    proc = _launch("--model-path", model_dir, "--speculative-algorithm", "SPARSESPEC")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: SPARSESPEC: needs a CUDA GPU")


# Signatures of the SGLang functions patches/server_args.py hooks in the installed release, by
# compat name: a change in SGLang fails here.
HOOKED_SIGNATURES = {
    "ServerArgs.add_cli_args": ["parser"],
    "ServerArgs.from_cli_args": ["cls", "args"],
    "prepare_server_args": ["argv"],
    **({"run_resolution_pipeline": ["server_args"], "ServerArgs.resolve_once": ["self"]}
       if compat.since("0.5.19") else {"run_resolution_pipeline": ["self"]}),  # __post_init__
}


def test_hooked_sglang_signatures_unchanged(sglang_loaded):
    import pkgutil

    from sglang.srt.server_args import ServerArgs

    from sparsespec_sglang.patches import server_args as patch

    names = {n for n, _, _ in patch.hooks()}
    assert names == set(HOOKED_SIGNATURES) | (set() if compat.since("0.5.20") else {"ServerArgs.__init__"})
    for name, params in HOOKED_SIGNATURES.items():
        owner, attr = compat.hook_target(name).rsplit(".", 1)
        fn = inspect.unwrap(inspect.getattr_static(pkgutil.resolve_name(owner), attr))
        fn = getattr(fn, "__func__", fn)
        assert list(inspect.signature(inspect.unwrap(fn)).parameters) == params, name
    if not compat.since("0.5.20"):
        # __init__ is the dataclass constructor: every keyword is a field.
        assert "speculative_num_steps" in inspect.signature(inspect.unwrap(ServerArgs.__init__)).parameters
    else:
        from sglang.srt.entrypoints.engine import Engine

        # Engine loads the plugins, then builds its record through the class attribute the plugin
        # set while they loaded (patches/server_args.EngineServerArgs).
        source = inspect.getsource(inspect.unwrap(Engine.__init__))
        assert source.index("load_plugins()") < source.index("self.server_args_class(**kwargs)")
        assert isinstance(Engine.__dict__["server_args_class"], patch.EngineServerArgs)
    if compat.since("0.5.19"):
        from sglang import launch_server

        # The launcher resolves after prepare_server_args returned: the resolve_once hook's errors.
        assert "server_args.resolve_once()" in inspect.getsource(launch_server.run_server)


def test_a_cpu_is_refused_in_one_line_outside_the_test_mode(sglang_loaded, model_dir, monkeypatch):
    from sparsespec_sglang.config import CPU_TEST_ENV

    monkeypatch.delenv(CPU_TEST_ENV)
    with pytest.raises(SparseSpecArgsError) as err:
        _server_args(model_dir)  # device="cpu"
    assert str(err.value) == ("SPARSESPEC: --device must be cuda (SPARSESPEC's kernels run on CUDA GPUs) "
                              "(got 'cpu')")
    monkeypatch.setenv(CPU_TEST_ENV, "1")
    assert _server_args(model_dir).device == "cpu"


FIRST_ENGINE = """
import sys
import sglang
try:
    sglang.Engine(model_path=sys.argv[1], device="cpu", speculative_algorithm="SPARSESPEC",
                  sparsespec_sparsity=4e-7)
except Exception as e:
    print(type(e).__name__, e)
"""


def test_the_first_engine_of_a_process_takes_sparsespec_keywords(model_dir):
    """No plugin loaded before ``sglang.Engine(...)``: Engine loads them itself, and the
    ``sparsespec_*`` keyword still reaches the checks (not SGLang's unknown-keyword refusal)."""
    out = subprocess.run([sys.executable, "-c", FIRST_ENGINE, model_dir], capture_output=True, text=True,
                         timeout=300)
    assert "--sparsespec-sparsity must be a number in [1e-06, 1]" in out.stdout, out.stdout + out.stderr[-3000:]
