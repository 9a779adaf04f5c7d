"""CycleProfiler bookkeeping on CPU, with fake CUDA events (the real ones run on the GPU host)."""

import pytest
import torch
from prometheus_client import CollectorRegistry

from sparsespec_sglang.profiling import CycleProfiler

PHASES = ("draft", "verify", "accept")  # the lockstep schedule's


class FakeEvent:
    """A CUDA event stand-in: a GPU timestamp, and whether the GPU has reached it yet."""

    clock = 0.0

    def __init__(self):
        self.t = None
        self.done = False

    def record(self):
        FakeEvent.clock += 1.0  # every phase takes 1 ms of "GPU" time
        self.t = FakeEvent.clock

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True

    def elapsed_time(self, other):
        return other.t - self.t


def _cycle(prof):
    prof.begin()
    for phase in PHASES:
        prof.mark(phase)
    prof.end_cycle(4, torch.tensor([2, 3, 1, 1]))


def test_gpu_times_are_folded_in_only_once_the_gpu_is_done():
    events = []

    def factory():
        events.append(FakeEvent())
        return events[-1]

    host_clock = iter(range(0, 1000, 2))  # every phase takes 2 s of host time
    prof = CycleProfiler(PHASES, every=1000, event_factory=factory, clock=lambda: next(host_clock))
    _cycle(prof)
    _cycle(prof)
    assert "gpu_cycle_ms" not in prof.summary()  # nothing finished: no wait, no numbers
    for e in events[:4]:
        e.done = True  # the first cycle completed on the GPU
    _cycle(prof)
    summary = prof.summary()
    assert prof.gpu_cycles == 1 and summary["cycles"] == 3 and summary["mean_batch"] == 4
    assert all(summary[f"gpu_{p}_ms"] == pytest.approx(1.0) for p in PHASES)
    assert summary["gpu_cycle_ms"] == pytest.approx(3.0)
    assert all(summary[f"host_{p}_ms"] == pytest.approx(2000.0) for p in PHASES)


def test_a_phase_that_ends_several_times_a_step_sums_its_intervals():
    """The unified schedule marks its phases once per pass: a step's phase time is their sum."""
    host_clock = iter(range(0, 1000, 1))
    prof = CycleProfiler(("inputs", "forward", "accept"), event_factory=FakeEvent,
                         clock=lambda: next(host_clock))
    prof.begin()
    for _ in range(3):  # three passes
        for phase in ("inputs", "forward", "forward", "accept"):  # forward: 2 ticks per pass
            prof.mark(phase)
    prof._marks[-1][2].done = True
    prof.end_cycle(2, torch.tensor([1, 1]))
    summary = prof.summary()
    assert summary["gpu_forward_ms"] == pytest.approx(6.0) and summary["gpu_inputs_ms"] == pytest.approx(3.0)
    assert summary["host_forward_ms"] == pytest.approx(6000.0)


def test_a_missing_or_unknown_phase_mark_is_an_error():
    prof = CycleProfiler(PHASES, event_factory=FakeEvent)
    with pytest.raises(RuntimeError, match="begin"):
        prof.mark("draft")
    prof.begin()
    prof.mark("draft")
    with pytest.raises(ValueError, match="unknown phase 'forward'"):
        prof.mark("forward")
    prof.mark("verify")
    with pytest.raises(RuntimeError, match="accept"):
        prof.end_cycle(1, torch.tensor([1]))


def test_profile_mode_syncs_and_counts_tokens(tmp_path):
    prof = CycleProfiler(PHASES, every=2, path=str(tmp_path / "p.json"), event_factory=FakeEvent)
    _cycle(prof)
    _cycle(prof)
    summary = prof.summary()
    assert prof.gpu_cycles == 2 and summary["tokens_per_cycle"] == 7
    assert (tmp_path / "p.json").exists()


def test_the_profile_flag_profiles_on_rank_zero_only(tmp_path):
    from sparsespec_sglang.config import SparseSpecConfig

    config = SparseSpecConfig.from_values(None, {"sparsespec_profile": str(tmp_path / "p.json")})
    profiled = CycleProfiler.configured(PHASES, config.profile, 0)
    assert profiled.path == tmp_path / "p.json" and profiled.every == 50
    assert CycleProfiler.configured(PHASES, config.profile, 1).path is None
    assert CycleProfiler.configured(PHASES, SparseSpecConfig().profile, 0).path is None


def test_gauges_carry_the_gpu_phase_means():
    registry = CollectorRegistry()
    prof = CycleProfiler(PHASES, every=1, event_factory=FakeEvent)
    prof.export_metrics({"model_name": "m"}, registry=registry)
    prof.begin()
    for phase in PHASES:
        prof.mark(phase)
    prof._marks[-1][2].done = True  # the cycle's last event has completed
    prof.end_cycle(2, torch.tensor([1, 1]))
    value = registry.get_sample_value("sparsespec:verify_gpu_ms_per_cycle", {"model_name": "m"})
    assert value == pytest.approx(1.0)
    # A second worker in the same process reuses the gauges instead of failing to register.
    CycleProfiler(PHASES, event_factory=FakeEvent).export_metrics({"model_name": "m"}, registry=registry)
    # A schedule with other phases adds its own gauges beside them.
    CycleProfiler(("inputs", "forward", "accept")).export_metrics({"model_name": "m"}, registry=registry)
    assert registry.get_sample_value("sparsespec:forward_gpu_ms_per_cycle", {"model_name": "m"}) == 0.0


def test_gauges_refresh_between_log_lines():
    registry = CollectorRegistry()
    prof = CycleProfiler(PHASES, every=1000, event_factory=FakeEvent, gauge_every=2)
    prof.export_metrics({"model_name": "g"}, registry=registry)
    for cycle in range(2):
        prof.begin()
        for phase in PHASES:
            prof.mark(phase)
        prof._marks[-1][2].done = True
        prof.end_cycle(1, torch.tensor([1]))
        value = registry.get_sample_value("sparsespec:draft_gpu_ms_per_cycle", {"model_name": "g"})
        assert value == (0.0 if cycle == 0 else pytest.approx(1.0))  # unset until cycle 2


class ClockEvent:
    """A CUDA event stand-in whose GPU timestamp is set by the test."""

    now = 0.0

    def __init__(self):
        self.t = None

    def record(self):
        self.t = ClockEvent.now

    def query(self):
        return self.t is not None and self.t <= ClockEvent.done_until

    def elapsed_time(self, other):
        return other.t - self.t


def test_pass_timer_splits_forward_time_from_the_time_between_forwards():
    from sparsespec_sglang.profiling import PassTimer

    ClockEvent.now, ClockEvent.done_until = 0.0, -1.0
    timer = PassTimer(every=10, event_factory=ClockEvent)
    assert not timer.sampling  # a server's first steps are never sampled
    timer.step = 8  # steps 8 and 9 are

    def step(passes=3, forward=5.0, gap=1.0, boundary=4.0):
        timer.begin_step()
        ClockEvent.now += boundary - gap
        for _ in range(passes):
            ClockEvent.now += gap
            timer.forward_start()
            ClockEvent.now += forward
            timer.forward_end()
        timer.end_step(passes)

    step()
    step()
    assert timer.summary() == {}  # the GPU has not reached the events: nothing read, no wait
    ClockEvent.done_until = ClockEvent.now
    for _ in range(8):
        step(gap=100.0)  # steps 10..17 are not sampled: their timings never count
    s = timer.summary()
    assert s["forward_gpu_ms"] == pytest.approx(5.0)
    assert s["step_boundary_gap_ms"] == pytest.approx(4.0)
    # per step: 2 gaps of 1 ms inside + the 4 ms boundary, over 3 passes
    assert s["outside_forward_ms_per_pass"] == pytest.approx(2.0)
    assert s["host_ms_per_pass"] >= 0
    # the host was ahead of the GPU at every forward: no gap can hold host time
    assert s["host_late_ms_per_pass"] == 0 and s["host_late_fraction"] == 0
    timer.reset()
    assert timer.summary() == {}


def test_pass_timer_counts_only_the_gaps_the_host_reached_late():
    from sparsespec_sglang.profiling import PassTimer

    ClockEvent.now, ClockEvent.done_until = 0.0, -1.0
    timer = PassTimer(every=10, event_factory=ClockEvent)
    assert not timer.sampling  # a server's first steps are never sampled
    timer.step = 8  # steps 8 and 9 are

    def step(late_at=None):
        timer.begin_step()
        ClockEvent.now += 3.0
        for i in range(3):
            ClockEvent.now += 1.0
            # the GPU finished the previous forward before the host launched this one
            if late_at is not None:
                ClockEvent.done_until = ClockEvent.now if i in late_at else -1.0
            timer.forward_start()
            ClockEvent.now += 5.0
            timer.forward_end()
        timer.end_step(3)

    step(late_at=(0,))  # step 0's first forward has no previous forward in the sample
    step(late_at=(0, 2))  # late at the 4 ms step boundary and at the second 1 ms gap
    ClockEvent.done_until = 1e9
    for _ in range(8):
        step()
    s = timer.summary()
    assert s["outside_forward_ms_per_pass"] == pytest.approx(2.0)
    assert s["host_late_ms_per_pass"] == pytest.approx((4.0 + 1.0) / 6)
    assert s["host_late_fraction"] == pytest.approx(2 / 5)


def test_per_step_values_are_exported_as_means_of_the_last_steps():
    """A schedule's per-step values (the unified schedule's speculating shares) are gauges
    ``sparsespec:<value>`` beside the phase times: the mean of the last ``gauge_every`` steps."""
    registry = CollectorRegistry()
    prof = CycleProfiler(PHASES, every=1000, event_factory=FakeEvent, gauge_every=2,
                         values=("speculating_requests_share",))
    prof.export_metrics({"model_name": "v"}, registry=registry)
    name = "sparsespec:speculating_requests_share"
    for cycle, share in enumerate([1.0, 0.5, 0.0, 0.25]):
        prof.begin()
        for phase in PHASES:
            prof.mark(phase)
        prof.note("speculating_requests_share", share)
        prof.end_cycle(1, torch.tensor([1]))
        if cycle == 1:
            assert registry.get_sample_value(name, {"model_name": "v"}) == pytest.approx(0.75)
    assert registry.get_sample_value(name, {"model_name": "v"}) == pytest.approx(0.125)
    assert prof.summary()["speculating_requests_share"] == pytest.approx(0.125)
    with pytest.raises(KeyError):
        prof.note("unknown", 1.0)
