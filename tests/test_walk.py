"""docs/architecture.md's walk of one unified step, traced: the package modules a step of the CPU
toy worker enters, in order (the toy model stands in for SGLang's model, so the attention layers'
stays -- attention.py, selection.py, kernels/ -- are covered by tests/test_mixed_pass.py; with no
CUDA graphs there is no replay context from compat/)."""

from __future__ import annotations

import os
import sys

from test_lockstep import Requests, _apply, make_worker

PACKAGE = os.path.dirname(os.path.abspath(__import__("sparsespec_sglang").__file__))


def _module(filename: str) -> str | None:
    path = os.path.abspath(filename)
    if not path.startswith(PACKAGE + os.sep):
        return None
    rel = os.path.relpath(path, PACKAGE)
    return rel.split(os.sep)[0] + "/" if os.sep in rel else rel


def test_one_unified_step_walks_the_documented_stays(monkeypatch):
    worker, _, _ = make_worker(monkeypatch, "unified", k=3)
    requests = Requests(7)
    batch = requests.prefill_batch(5)
    _apply(worker.forward_batch_generation(batch), batch, 3)
    batch = requests.decode_batch()
    stays: list[str] = []

    def trace(frame, event, arg):
        if event != "call":
            return
        module = _module(frame.f_code.co_filename)
        if module is None or module == _module(frame.f_back.f_code.co_filename):
            return  # not the package, or a call inside the caller's module
        if not stays or stays[-1] != module:
            stays.append(module)

    sys.setprofile(trace)
    try:
        worker.forward_batch_generation(batch)
    finally:
        sys.setprofile(None)
    head = ["worker.py", "compat/", "unified.py", "profiling.py", "phases.py", "schedule.py"]
    forward = ["forward_plan.py", "profiling.py", "forward_graphs.py", "attention.py", "profiling.py"]
    verify = ["acceptance.py", "pillar.py", "profiling.py"]  # passes with verifying requests
    tail = ["schedule.py", "lockstep.py"]
    assert stays[:len(head)] == head and stays[-len(tail):] == tail
    passes, i = 0, len(head)
    while i < len(stays) - len(tail):
        assert stays[i:i + len(forward)] == forward, stays
        i += len(forward)
        if stays[i:i + len(verify)] == verify:
            i += len(verify)
        passes += 1
    assert passes == 4  # k + 1
    walk = head + forward + verify + tail  # the pass loop walked once
    returns = sum(module in walk[:i] for i, module in enumerate(walk))
    assert returns == 4  # the documented 5, less the graph replay's compat/ stay
