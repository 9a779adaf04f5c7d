"""KV offload copy timing (sparsespec_sglang/offload.py, patches/hicache_io.py) on CPU, with fake
CUDA events on a fake GPU clock; the hooked SGLang signatures are checked against the real ones."""

import inspect
import logging
import pkgutil
from types import SimpleNamespace

import pytest

from sparsespec_sglang import compat, offload
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
def active():
    """The stats ``offload.activate`` would put on a tree cache, its controller and its layer
    counter; the fakes the tests hand the hooks carry it (``_on``)."""
    return _stats()


def _on(owner, stats):
    setattr(owner, offload.STATS_ATTR, stats)
    return owner


def _controller(n_tokens, per_token=1000):
    return SimpleNamespace(
        write_queue=[SimpleNamespace(host_indices=list(range(n))) for n in n_tokens],
        load_queue=[SimpleNamespace(host_indices=list(range(n))) for n in n_tokens],
        ack_load_queue=[], ack_write_queue=[], write_stream="write-stream", has_draft=False,
        mem_pool_host=SimpleNamespace(size_per_token=per_token))


def _ack(start, finish, tokens, timed, num_bytes):
    """SGLang's HiCacheAck for a copy of ``tokens`` tokens (0.5.17's has no byte count)."""
    from sglang.srt.managers.cache_controller import HiCacheAck

    extra = {"num_bytes": num_bytes} if compat.since("0.5.18") else {}
    return HiCacheAck(start_event=start, finish_event=finish, node_ids=[], num_tokens=tokens,
                      timing_enabled=timed, **extra)


def test_write_hook_times_the_merged_copy(active):
    from sparsespec_sglang.patches import hicache_io

    ctl = _on(_controller([3, 5]), active)
    events = []
    active._make_event = lambda: events.append(FakeEvent()) or events[-1]
    sglang_times_it = compat.since("0.5.18")
    # From 0.5.18 SGLang times the copy on the copy stream and counts its bytes (a side pool's
    # included: 8 tokens x 1000 + 64); up to 0.5.17 its write ack is untimed.
    ack = _ack(FakeEvent(1.0), FakeEvent(3.0), 8, True, 8064) if sglang_times_it else \
        _ack(FakeEvent(), FakeEvent(), 0, False, None)

    def original(self):
        if not sglang_times_it:
            assert len(events) == 1 and events[0].recorded_on is None  # start: on the compute stream
        self.write_queue.clear()
        self.ack_write_queue.append(ack)
        return "done"

    assert hicache_io.start_writing(original, ctl) == "done"
    if sglang_times_it:
        assert events == [] and active.bytes["write"] == 8064 and active.ms["write"] == 2.0
    else:
        start, end = events
        assert end.recorded_on == "write-stream"
        start.t, end.t = 1.0, 3.0
        active.poll()
        assert active.bytes["write"] == 8 * 1000 and active.ms["write"] == 2.0
    assert hicache_io.start_writing(lambda self: "idle", ctl) == "idle"  # nothing queued
    assert active.count["write"] == 1


def test_load_hook_reuses_sglangs_ack_events(active):
    from sparsespec_sglang.patches import hicache_io

    ctl = _on(_controller([4], per_token=10), active)
    # SGLang's own byte count from 0.5.18 (a side pool's included); 4 x 10 up to 0.5.17.
    nbytes = 48 if compat.since("0.5.18") else 40
    ack = _ack(FakeEvent(0.0), FakeEvent(0.5), 4, True, 48)

    def original(self):
        self.load_queue.clear()
        self.ack_load_queue.append(ack)
        return 1

    assert hicache_io.start_loading(original, ctl) == 1
    assert active.bytes["load"] == nbytes and active.ms["load"] == 0.5
    # Nothing queued, or no producer: SGLang's path only.
    assert hicache_io.start_loading(lambda self: -1, ctl) == -1
    assert active.count["load"] == 1


def test_wait_hook_times_only_unfinished_loads(active, monkeypatch):
    import torch

    from sparsespec_sglang.patches import hicache_io

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    layer_events = [FakeEvent(1.0), FakeEvent()]  # layer 0 loaded, layer 1 still loading
    counter = _on(SimpleNamespace(consumer_index=0, events=[SimpleNamespace(load_events=layer_events)]), active)
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
    tree = _on(SimpleNamespace(), active)
    evicted = []

    def original(self, num_tokens, *args, **kwargs):
        evicted.append((self, num_tokens, args, kwargs))
        return num_tokens - 1

    assert hicache_io.evict_host(original, tree, 3) == 2
    assert hicache_io.evict_host(original, tree, 1, component_type="SWA") == 0
    assert evicted == [(tree, 3, (), {}), (tree, 1, (), {"component_type": "SWA"})]
    assert active.host_full == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(  # rate-limited
        "SPARSESPEC KV offload: host pool full (3 tokens asked; 1 times so far)")
    assert "host pool full 2 times" in active.summary_line()


def test_hooks_do_nothing_until_activated_then_share_the_trees_stats(monkeypatch):
    """Until a tree cache keeps a retracted request's KV the hooks only call SGLang; ``activate``
    then puts one TransferStats on the tree, its controller and its layer counter (idempotent), and
    another tree's objects stay unmeasured."""
    import torch

    from sparsespec_sglang.patches import hicache_io

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    ctl = _controller([3])
    ctl.layer_done_counter = SimpleNamespace(consumer_index=0, events=[SimpleNamespace(load_events=[FakeEvent()])])
    tree = SimpleNamespace(cache_controller=ctl)
    assert hicache_io.start_writing(lambda self: "w", ctl) == "w"
    assert hicache_io.start_loading(lambda self: 2, ctl) == 2
    assert hicache_io.evict_host(lambda self, n: n, tree, 5) == 5
    assert hicache_io.wait_until(lambda self, t: t, ctl.layer_done_counter, 0) == 0
    assert offload.stats_of(tree) is offload.stats_of(ctl) is offload.stats_of(ctl.layer_done_counter) is None

    stats = offload.activate(tree)
    assert offload.activate(tree) is stats
    assert offload.stats_of(ctl) is stats and offload.stats_of(ctl.layer_done_counter) is stats
    stats._make_event = FakeEvent
    assert hicache_io.evict_host(lambda self, n: n, tree, 5) == 5
    assert hicache_io.wait_until(lambda self, t: t, ctl.layer_done_counter, 0) == 0
    assert stats.host_full == 1 and len(stats._pending["wait"]) == 1  # the layer wait is timed
    other = _controller([3])
    assert hicache_io.start_writing(lambda self: "w", other) == "w" and stats.count["write"] == 0
    bare = SimpleNamespace(cache_controller=None)  # no host tier: nothing to time but the tree
    assert offload.activate(bare) is not stats and offload.stats_of(bare) is not None


def _hicache_classes():
    """(tree cache class --enable-hierarchical-cache builds for a plain model, its controller class)."""
    from sglang.srt.managers.cache_controller import HiCacheController

    if compat.since("0.5.19"):
        from sglang.srt.mem_cache.hybrid_cache.hybrid_cache_controller import HybridCacheController
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        return UnifiedRadixCache, HybridCacheController
    from sglang.srt.mem_cache.hiradix_cache import HiRadixCache

    return HiRadixCache, HiCacheController


def test_hooked_sglang_signatures_and_fields():
    """Fails when SGLang changes what the hooks rely on, per release."""
    from sglang.srt.managers import cache_controller as cc
    from sglang.srt.mem_cache import registry
    from sglang.srt.plugins import load_plugins

    from sparsespec_sglang.patches import hicache_io

    since_18, since_19 = compat.since("0.5.18"), compat.since("0.5.19")
    expected = {"HiCacheController.start_writing": ["self"], "HiCacheController.start_loading": ["self"],
                "HiCache.evict_host": ["self", "num_tokens", *(["component_type"] if since_19 else [])],
                "LayerDoneCounter.wait_until": ["self", "threshold"]}
    assert {name for name, _, _ in hicache_io.HOOKS} == set(expected)
    load_plugins()
    for name, params in expected.items():
        owner, attr = compat.hook_target(name).rsplit(".", 1)
        installed = inspect.getattr_static(pkgutil.resolve_name(owner), attr)
        fn = inspect.unwrap(installed)
        assert fn is not installed, f"{name} not hooked"
        assert list(inspect.signature(fn).parameters) == params, name

    # The tree cache HiCache builds for a plain model, whose controller runs the hooked copies
    # (from 0.5.19 a subclass that keeps HiCacheController's start_writing / start_loading).
    tree_class, controller_class = _hicache_classes()
    assert compat.resolve("HiCache.evict_host") is getattr(tree_class, "evict_host")
    factory = inspect.getsource(registry)
    assert ("cache.init_hicache(server_args, params)" if since_19 else "HiRadixCache(params=params") in factory
    assert ("HiRadixCache" in factory) is not since_19
    assert issubclass(controller_class, cc.HiCacheController)
    assert not {"start_writing", "start_loading"} & set(vars(controller_class)) - set(vars(cc.HiCacheController))
    # A copy that finds the host pool full makes the tree evict host copies.
    backup = tree_class._execute_kv_backup if since_19 else tree_class.write_backup
    assert "self.evict_host(" in inspect.getsource(backup)

    # What the hooks read off SGLang's objects.
    init = inspect.getsource(cc.HiCacheController.__init__)
    for attr in ("self.write_queue", "self.load_queue", "self.ack_load_queue", "self.ack_write_queue",
                 "self.mem_pool_host", *(() if since_18 else ("self.write_stream", "self.has_draft"))):
        assert attr in init, attr
    assert {"start_event", "finish_event", "timing_enabled", *(["num_bytes"] if since_18 else [])} <= set(
        cc.HiCacheAck._fields)
    writing = inspect.getsource(cc.HiCacheController.start_writing)
    assert "self.ack_write_queue.append(" in writing
    # From 0.5.18 the write ack is timed on the copy stream like the load ack; up to 0.5.17 the copy
    # runs on write_stream and its ack takes no timing.
    assert ("timing_enabled=completion.timing_enabled" in writing) is since_18
    assert ("device_module.stream(self.write_stream)" in writing) is not since_18
    assert "timing_enabled=" in inspect.getsource(cc.HiCacheController.start_loading)
    assert "host_indices" in inspect.signature(cc.CacheOperation.__init__).parameters
    assert "self.load_events" in inspect.getsource(cc.LayerLoadingEvent.__init__)
    assert {"consumer_index", "events"} <= set(vars(cc.LayerDoneCounter(2)))
    # offload.activate(tree) reaches the controller that runs the copies and the layer counter the KV
    # pools wait on through the tree: the tree's cache_controller and its layer_done_counter.
    assert "register_layer_transfer_counter(self.layer_done_counter)" in init
    if since_19:
        from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler

        assembler = inspect.getsource(hybrid_pool_assembler)
        assert "cache.cache_controller = result.cache_controller" in assembler
        assert "kvcache.register_layer_transfer_counter(result.cache_controller.layer_done_counter)" in assembler
    else:
        assert "self.cache_controller = HiCacheController(" in inspect.getsource(tree_class.__init__)
