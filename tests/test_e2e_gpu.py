"""End-to-end on the GPU host: SPARSESPEC greedy output equals plain SGLang decoding."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parent.parent


def test_greedy_output_equals_plain_decoding(tmp_path):
    out = tmp_path / "lossless.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_lossless.py"), "--out", str(out),
         "--num-prompts", "8", "--max-new-tokens", "128", "--prompt-len", "64", "256"],
        capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    for name, run in runs.items():
        if name != "plain":
            assert run["equal"], (name, run["mismatches"])
            assert run["mean_spec_accept_length"] > 1.0, name
