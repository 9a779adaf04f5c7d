"""The examples run as written: on a machine without what they need (a CUDA GPU, a running
server) each stops with one clear line and a non-zero status, not a traceback; `--help` prints the
usage; the CPU example runs on the real model."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    # The examples call `python`: make it this interpreter, as in an activated virtualenv.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@no_gpu
def test_launch_server_needs_a_gpu():
    line = _one_line(_run(["bash", "examples/launch_server.sh"]))
    assert line.startswith("launch_server.sh: this example needs a CUDA GPU"), line


@no_gpu
def test_offline_batch_needs_a_gpu():
    line = _one_line(_run([sys.executable, "examples/offline_batch.py", "--num-prompts", "2"]))
    assert line.startswith("offline_batch.py: this example needs a CUDA GPU"), line


def test_frontend_program_needs_a_server():
    url = f"http://127.0.0.1:{_free_port()}"
    line = _one_line(_run([sys.executable, "examples/frontend_program.py", "--url", url]))
    assert line.startswith(f"frontend_program.py: no healthy SGLang server at {url}"), line


def test_launch_server_help_is_the_usage_not_a_model_path():
    proc = _run(["bash", "examples/launch_server.sh", "--help"])
    assert proc.returncode == 0 and proc.stdout.startswith("Serve a model with SPARSESPEC"), proc.stderr
    assert "examples/launch_server.sh [MODEL] [PORT]" in proc.stdout
    line = _one_line(_run(["bash", "examples/launch_server.sh", "--port", "1"]))
    assert line.startswith("launch_server.sh: the first argument is MODEL"), line


@pytest.mark.parametrize("example", ["reference_on_cpu.py", "offline_batch.py", "frontend_program.py"])
def test_python_examples_have_help(example):
    proc = _run([sys.executable, f"examples/{example}", "--help"])
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


def test_reference_on_cpu_runs_on_the_real_model():
    proc = _run([sys.executable, "examples/reference_on_cpu.py", "--max-new-tokens", "16"])
    assert proc.returncode == 0, proc.stderr
    assert "identical to plain decoding: True" in proc.stdout
    assert "drafts accepted per cycle (of 8): [" in proc.stdout
