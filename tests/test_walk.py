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


def _trace_one_step(worker, batch) -> list[str]:
    stays: list[str] = []

    def trace(frame, event, arg):
        if event != "call":
            return
        module = _module(frame.f_code.co_filename)
        caller = frame.f_back
        while caller.f_code.co_filename == "<string>":
            caller = caller.f_back  # code a dataclass generated (its __init__) is its class's module's
        if module is None or module == _module(caller.f_code.co_filename):
            return  # not the package, or a call inside the caller's module
        if not stays or stays[-1] != module:
            stays.append(module)

    sys.setprofile(trace)
    try:
        worker.forward_batch_generation(batch)
    finally:
        sys.setprofile(None)
    return stays


def _count_passes(stays: list[str], head: list[str], forward: list[str], tail: list[str],
                  *endings: list[str]) -> int:
    """The step's passes in ``stays``: ``head``, then per pass ``forward`` and one of ``endings``
    (or none where the first ending is optional: a pass without verifies), then ``tail``."""
    assert stays[:len(head)] == head and stays[-len(tail):] == tail, " ".join(stays)
    passes, i = 0, len(head)
    while i < len(stays) - len(tail):
        assert stays[i:i + len(forward)] == forward, stays
        i += len(forward)
        ending = next((e for e in endings if stays[i:i + len(e)] == e), None)
        assert ending is not None or len(endings) == 1, stays
        i += len(ending or [])
        passes += 1
    return passes


def test_one_unified_step_walks_the_documented_stays(monkeypatch):
    worker, _, _ = make_worker(monkeypatch, "unified", k=3)
    requests = Requests(7)
    batch = requests.prefill_batch(5)
    _apply(worker.forward_batch_generation(batch), batch, 3)
    stays = _trace_one_step(worker, requests.decode_batch())
    head = ["worker.py", "compat/", "unified.py", "profiling.py", "phases.py", "schedule.py"]
    forward = ["forward_plan.py", "profiling.py", "forward_graphs.py", "attention.py", "profiling.py"]
    verify = ["acceptance.py", "pillar.py", "profiling.py"]  # passes with verifying requests
    tail = ["schedule.py", "lockstep.py"]
    assert _count_passes(stays, head, forward, tail, verify) == 4  # k + 1
    walk = head + forward + verify + tail  # the pass loop walked once
    returns = sum(module in walk[:i] for i, module in enumerate(walk))
    assert returns == 4  # the documented 5, less the graph replay's compat/ stay


def test_an_adaptive_step_adds_the_policy_and_the_mode_transitions(monkeypatch):
    """--sparsespec-adaptive on: the policy's stay (what it measured, its choice, K of each context
    from selection.py) and PillarState's mode transitions come before the planner; a pass's dense
    rows are accepted with the verify chains (one acceptance stay), and the last pass leaves their
    token pending in the PillarState stay of the verifies' commit. Two more returns than the
    default walk: selection.py (the attention's layer groups) and pillar.py (the commit)."""
    worker, _, _ = make_worker(monkeypatch, "unified", k=3, adaptive="on")
    requests = Requests(7)
    batch = requests.prefill_batch(5)
    _apply(worker.forward_batch_generation(batch), batch, 3)
    batch = requests.decode_batch()
    policy = worker.schedule.policy
    real = policy.decide
    dense_row = batch.reqs[0].req_pool_idx
    # the policy runs (its stay is walked); its choice is overridden to a mix: one request decodes
    # densely (so the transition is walked), the others speculate
    monkeypatch.setattr(policy, "decide",
                        lambda contexts: {**{r: True for r in real(contexts)}, dense_row: False})
    stays = _trace_one_step(worker, batch)
    assert worker.schedule.dense and len(worker.schedule.dense) < 5
    head = ["worker.py", "compat/", "unified.py", "profiling.py", "adaptive.py", "selection.py", "pillar.py",
            "phases.py", "schedule.py"]
    forward = ["forward_plan.py", "profiling.py", "forward_graphs.py", "attention.py", "profiling.py"]
    verify = ["acceptance.py", "pillar.py", "profiling.py"]  # verifies, or the last pass's dense rows
    dense = ["acceptance.py", "profiling.py"]  # a pass with dense rows and no verify
    tail = ["schedule.py", "lockstep.py"]
    assert _count_passes(stays, head, forward, tail, verify, dense) == 4
    # the documented walk's attention layers: attention.py, then selection.py and kernels/
    walk = head + forward[:4] + ["selection.py", "kernels/"] + forward[4:] + verify + tail
    returns = sum(module in walk[:i] for i, module in enumerate(walk))
    assert returns == 6  # the documented 7, less the graph replay's compat/ stay
