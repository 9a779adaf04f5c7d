"""KV offload copy timing (sparsespec_sglang/offload.py, patches/hicache_io.py) on CPU, with fake
CUDA events on a fake GPU clock; the hooked SGLang signatures are checked against the real ones."""

import inspect
import logging
import pkgutil
from types import SimpleNamespace

import pytest

from sparsespec_sglang import offload
from sparsespec_sglang.offload import TransferStats


class FakeEvent:
    """A CUDA event on a fake GPU timeline: ``t`` is set when the fake GPU reaches it."""

    def __init__(self, t=None):
        self.t = t
        self.recorded_on = "unrecorded"

    def record(self, stream=None):
        self.recorded_on = stream

    def query(self):
        return self.t is not None

    def elapsed_time(self, end):
        assert self.t is not None and end.t is not None, "read before completion"
        return end.t - self.t


def _stats(**kw):
    return TransferStats(FakeEvent, **kw)


def test_copies_fold_in_only_once_completed_and_in_order():
    stats = _stats()
    first_end, second_end = FakeEvent(), FakeEvent(12.0)
    stats.add("load", 2_000_000, FakeEvent(0.0), first_end)
    stats.add("load", 1_000_000, FakeEvent(10.0), second_end)  # done, but queued behind the first
    assert stats.count["load"] == 0 and stats.bytes["load"] == 0
    first_end.t = 4.0
    stats.poll()
    assert stats.count["load"] == 2 and stats.bytes["load"] == 3_000_000 and stats.ms["load"] == 6.0
    assert stats.gbps("load") == pytest.approx(3_000_000 / 6.0 / 1e6)  # 0.5 GB/s
    assert stats.gbps("write") is None


def test_queued_writes_count_busy_time_not_queueing():
    stats = _stats()
    # Write 1 runs 0..5 ms. Write 2 is issued at 2 ms but can only start when write 1 ends (5 ms)
    # and ends at 9 ms: 4 ms of copy, not 7. Write 3 is issued after the stream went idle.
    stats.add("write", 500, FakeEvent(0.0), FakeEvent(5.0))
    stats.add("write", 400, FakeEvent(2.0), FakeEvent(9.0))
    stats.add("write", 100, FakeEvent(20.0), FakeEvent(21.0))
    assert stats.ms["write"] == 5.0 + 4.0 + 1.0
    assert stats.bytes["write"] == 1000 and stats.count["write"] == 3


def test_log_line_rate_limited_and_only_on_change(caplog):
    now = [0.0]
    stats = _stats(log_interval_s=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="sparsespec_sglang.offload")
    stats.add("write", 3_000_000_000, FakeEvent(0.0), FakeEvent(100.0))  # 3 GB in 100 ms
    stats.add("wait", 0, FakeEvent(0.0), FakeEvent(1.5))
    assert not caplog.records  # interval not reached
    now[0] = 11.0
    stats.poll()
    now[0] = 30.0
    stats.poll()  # nothing new: no second line
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["SPARSESPEC KV offload: host writes 3.000 GB in 1 copies, 100.0 ms of copy time "
                     "(30.0 GB/s); loads 0.000 GB in 0 copies, 0.0 ms of copy time (n/a GB/s); "
                     "compute stream waited 1.5 ms on loads (1 layer waits); host pool full 0 times"]


@pytest.fixture
def active(monkeypatch):
    stats = _stats()
    monkeypatch.setattr(offload, "_stats", stats)
    return stats


def _controller(n_tokens, per_token=1000):
    return SimpleNamespace(
        write_queue=[SimpleNamespace(host_indices=list(range(n))) for n in n_tokens],
        load_queue=[SimpleNamespace(host_indices=list(range(n))) for n in n_tokens],
        ack_load_queue=[], write_stream="write-stream",
        mem_pool_host=SimpleNamespace(size_per_token=per_token))


def test_write_hook_times_the_merged_copy(active):
    from sparsespec_sglang.patches import hicache_io

    ctl = _controller([3, 5])
    events = []
    active._make_event = lambda: events.append(FakeEvent()) or events[-1]

    def original(self):
        assert len(events) == 1 and events[0].recorded_on is None  # start: on the compute stream
        self.write_queue.clear()
        return "done"

    assert hicache_io.start_writing(original, ctl) == "done"
    start, end = events
    assert end.recorded_on == "write-stream"
    start.t, end.t = 1.0, 3.0
    active.poll()
    assert active.bytes["write"] == 8 * 1000 and active.ms["write"] == 2.0


def test_load_hook_reuses_sglangs_ack_events(active):
    from sparsespec_sglang.patches import hicache_io

    ctl = _controller([4], per_token=10)
    ack = SimpleNamespace(start_event=FakeEvent(0.0), finish_event=FakeEvent(0.5), timing_enabled=True)

    def original(self):
        self.load_queue.clear()
        self.ack_load_queue.append(ack)
        return 1

    assert hicache_io.start_loading(original, ctl) == 1
    assert active.bytes["load"] == 40 and active.ms["load"] == 0.5
    # Nothing queued, or no producer: SGLang's path only.
    assert hicache_io.start_loading(lambda self: -1, ctl) == -1
    assert active.count["load"] == 1


def test_wait_hook_times_only_unfinished_loads(active, monkeypatch):
    import torch

    from sparsespec_sglang.patches import hicache_io

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    layer_events = [FakeEvent(1.0), FakeEvent()]  # layer 0 loaded, layer 1 still loading
    counter = SimpleNamespace(consumer_index=0, events=[SimpleNamespace(load_events=layer_events)])
    made = []
    active._make_event = lambda: made.append(FakeEvent(float(len(made)) * 2)) or made[-1]
    calls = []
    original = lambda self, threshold: calls.append(threshold)  # noqa: E731
    hicache_io.wait_until(original, counter, 0)
    assert made == []  # already loaded: no events
    hicache_io.wait_until(original, counter, 1)
    assert calls == [0, 1] and active.count["wait"] == 1 and active.ms["wait"] == 2.0
    counter.consumer_index = -1  # a batch without loads
    hicache_io.wait_until(original, counter, 1)
    assert len(made) == 2


def test_host_pool_full_is_counted_and_logged(active, caplog):
    from sparsespec_sglang.patches import hicache_io

    caplog.set_level(logging.INFO, logger="sparsespec_sglang.offload")
    ctl = _controller([])
    assert hicache_io.write(lambda self, **kw: "slots", ctl, device_indices=[1, 2]) == "slots"
    assert active.host_full == 0
    assert hicache_io.write(lambda self, *a, **kw: None, ctl, [1, 2, 3], node_id=4) is None
    assert hicache_io.write(lambda self, *a, **kw: None, ctl, device_indices=[1]) is None
    assert active.host_full == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(  # rate-limited
        "SPARSESPEC KV offload: host pool full (3 tokens asked; 1 times so far)")
    assert "host pool full 2 times" in active.summary_line()


def test_hooks_do_nothing_until_activated(monkeypatch):
    from sparsespec_sglang.patches import hicache_io

    monkeypatch.setattr(offload, "_stats", None)
    ctl = _controller([3])
    assert hicache_io.start_writing(lambda self: "w", ctl) == "w"
    assert hicache_io.start_loading(lambda self: 2, ctl) == 2
    assert hicache_io.write(lambda self, *a: None, ctl, [1]) is None
    assert hicache_io.wait_until(lambda self, t: t, SimpleNamespace(consumer_index=0), 7) == 7
    assert offload.active_stats() is None
    assert offload.activate() is offload.activate() is offload.active_stats()


def test_hooked_sglang_signatures_and_fields():
    from sglang.srt.managers import cache_controller as cc
    from sglang.srt.plugins import load_plugins

    from sparsespec_sglang.patches import hicache_io

    expected = {"HiCacheController.start_writing": ["self"], "HiCacheController.start_loading": ["self"],
                "HiCacheController.write": ["self", "device_indices", "priority", "node_id"],
                "LayerDoneCounter.wait_until": ["self", "threshold"]}
    assert {t for t, _, _ in hicache_io.HOOKS} == {f"{hicache_io.MODULE}.{k}" for k in expected}
    for target, params in expected.items():
        owner, attr = f"{hicache_io.MODULE}.{target}".rsplit(".", 1)
        installed = inspect.getattr_static(pkgutil.resolve_name(owner), attr)
        fn = inspect.unwrap(installed)
        assert list(inspect.signature(fn).parameters) == params, target
        load_plugins()
        assert inspect.getattr_static(pkgutil.resolve_name(owner), attr) is not fn, f"{target} not hooked"
    # What the hooks read off SGLang's objects.
    init = inspect.getsource(cc.HiCacheController.__init__)
    for attr in ("self.write_queue", "self.load_queue", "self.ack_load_queue", "self.write_stream",
                 "self.mem_pool_host"):
        assert attr in init, attr
    assert {"start_event", "finish_event", "timing_enabled"} <= set(cc.HiCacheAck._fields)
    assert "host_indices" in inspect.signature(cc.CacheOperation.__init__).parameters
    assert "self.load_events" in inspect.getsource(cc.LayerLoadingEvent.__init__)
    assert {"consumer_index", "events"} <= set(vars(cc.LayerDoneCounter(2)))
