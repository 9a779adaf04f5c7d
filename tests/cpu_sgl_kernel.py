"""Test helpers around the stand-in sgl_kernel (tests/sgl_kernel_cpu/sgl_kernel): installing it in
this process, and letting SGLang's ``eagle_sample`` take its sampled branch on a CPU.

SGLang's ``eagle_sample`` samples through CUDA-only sgl_kernel ops, and on a CPU it takes the
argmax whatever the temperature. With the stand-ins a CPU test runs SGLang's *real* sampled
acceptance around them, so what is under test is the plugin's path into it (the schedule's
chain layout, the per-request sampling parameters, plain's filtering): a lossy path there shows
as a distribution that differs from plain sampling.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent / "sgl_kernel_cpu"  # put on PYTHONPATH of engine processes
_spec = importlib.util.spec_from_file_location("sgl_kernel", PACKAGE_ROOT / "sgl_kernel" / "__init__.py")
standin = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(standin)
top_k_renorm_prob = standin.top_k_renorm_prob
top_p_renorm_prob = standin.top_p_renorm_prob
tree_speculative_sampling_target_only = standin.tree_speculative_sampling_target_only


def install(monkeypatch) -> None:
    """The stand-in as this process's ``sgl_kernel`` for the test's duration."""
    monkeypatch.setitem(sys.modules, "sgl_kernel", standin)


def sampled_eagle_sample_on_cpu(monkeypatch) -> None:
    """Make SGLang's ``eagle_sample`` take its sampled branch on a CPU, one process, no TP.

    0.5.17 imports the sampling ops from sgl_kernel inside the call; from 0.5.23 they are names
    of ``eagle_utils`` resolved per platform at import (None on a CPU). Both take the argmax on a
    CPU (``_is_cpu``) and read the accept thresholds from ``get_spec()``."""
    from sglang.srt.speculative import eagle_utils

    install(monkeypatch)
    monkeypatch.setattr(eagle_utils, "_is_cpu", False)
    for fn in (top_k_renorm_prob, top_p_renorm_prob, tree_speculative_sampling_target_only):
        if hasattr(eagle_utils, fn.__name__):
            monkeypatch.setattr(eagle_utils, fn.__name__, fn)
    spec = types.SimpleNamespace(speculative_use_rejection_sampling=False, speculative_accept_threshold_single=1.0,
                                 speculative_accept_threshold_acc=1.0, speculative_use_block_verification=False)
    monkeypatch.setattr(eagle_utils, "get_spec", lambda: spec)
    one = types.SimpleNamespace(world_size=1)
    parallel = types.SimpleNamespace(tp_group=one, attn_tp_group=one)
    monkeypatch.setattr("sglang.srt.runtime_context.get_parallel", lambda: parallel)
    if hasattr(eagle_utils, "get_parallel"):
        monkeypatch.setattr(eagle_utils, "get_parallel", lambda: parallel)
    monkeypatch.setattr("sglang.srt.distributed.get_tp_group", lambda: one, raising=False)
    monkeypatch.setattr("sglang.srt.layers.dp_attention.is_dp_attention_enabled", lambda: False)
