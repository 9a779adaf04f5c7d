"""patches/server_args.py: what a SPARSESPEC launch checks before SGLang resolves its arguments, and
in which order. A bad flag value is named first, also on a machine without a CUDA GPU (a laptop),
where the next check would stop the launch with the CUDA line instead; then the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsespec_sglang import compat
from sparsespec_sglang.config import CPU_TEST_ENV, SparseSpecArgsError

NO_GPU = "SPARSESPEC: needs a CUDA GPU (--device cuda), but torch.cuda.is_available() is False on this machine"
NOT_CUDA = "SPARSESPEC: --device must be cuda (SPARSESPEC's kernels run on CUDA GPUs) (got 'cpu')"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    config = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
        "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    path = tmp_path_factory.mktemp("model")
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture
def laptop(monkeypatch):
    """A user's machine: no CUDA GPU, and not the project's CPU test mode."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    monkeypatch.delenv(CPU_TEST_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _resolve(model_dir: str, **kwargs) -> None:
    """Build and resolve a SPARSESPEC record as ``sglang.Engine(**kwargs)`` would."""
    from sparsespec_sglang.patches.server_args import new_server_args

    sa = new_server_args(model_path=model_dir, skip_tokenizer_init=True, speculative_algorithm="SPARSESPEC",
                         **kwargs)
    compat.resolve_server_args(sa)


def _message(model_dir: str, **kwargs) -> str:
    with pytest.raises(SparseSpecArgsError) as err:
        _resolve(model_dir, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsespec_sparsity=0.0), "SPARSESPEC: --sparsespec-sparsity must be a number in [1e-06, 1] (got 0.0)"),
    (dict(sparsespec_schedule="fast"), "SPARSESPEC: --sparsespec-schedule must be one of: unified, lockstep"),
    (dict(sparsespec_adaptive="yes"), "SPARSESPEC: --sparsespec-adaptive must be one of: on, off (got 'yes')"),
    (dict(sparsespec_dense_backend="flashinfer"),
     "SPARSESPEC: --sparsespec-dense-backend must be triton unless --sparsespec-adaptive on (only adaptive "
     "speculation runs all-dense passes) (got 'flashinfer')"),
    (dict(speculative_num_steps=40), "SPARSESPEC: --speculative-num-steps must be an integer in [1, 32] (got 40)"),
    (dict(speculative_eagle_topk=4), "SPARSESPEC: --speculative-eagle-topk must be 1"),
    (dict(speculative_num_steps=4, speculative_num_draft_tokens=8),
     "SPARSESPEC: --speculative-num-draft-tokens must be --speculative-num-steps + 1 = 5 (got 8)"),
    (dict(speculative_accept_threshold_single=0.5), "SPARSESPEC: --speculative-accept-threshold-single must be 1.0"),
    (dict(enable_deterministic_inference=True, sparsespec_score_norm="draft"),
     "SPARSESPEC: --sparsespec-score-norm must be exact with --enable-deterministic-inference"),
])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_a_bad_flag_value_is_named_before_the_device_is_checked(laptop, model_dir, kwargs, message, device):
    assert _message(model_dir, device=device, **kwargs).startswith(message)


def test_good_flags_on_a_machine_without_cuda_get_the_cuda_line(laptop, model_dir):
    assert _message(model_dir, sparsespec_sparsity=0.1, speculative_num_steps=4) == NO_GPU


def test_device_cpu_is_refused_in_one_line_outside_the_test_mode(laptop, model_dir, monkeypatch):
    assert _message(model_dir, device="cpu") == NOT_CUDA
    monkeypatch.setenv(CPU_TEST_ENV, "1")
    _resolve(model_dir, device="cpu")


# SGLang's two server commands: the module, and the `sglang` console script it installs.
ENTRIES = {"launch_server": [sys.executable, "-m", "sglang.launch_server"],
           "sglang serve": [str(Path(sys.executable).parent / "sglang"), "serve"]}


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_the_command_line_names_the_bad_flag_on_a_machine_without_cuda(model_dir, entry):
    """What a user on a laptop runs: one line naming the flag, whatever the machine."""
    env = {k: v for k, v in os.environ.items() if k != CPU_TEST_ENV}
    proc = subprocess.run([*ENTRIES[entry], "--model-path", model_dir, "--speculative-algorithm",
                           "SPARSESPEC", "--sparsespec-sparsity", "0"], capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONWARNINGS": "ignore"}, cwd=Path(model_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: SPARSESPEC: --sparsespec-sparsity must be a number in [1e-06, 1] (got 0.0)")
