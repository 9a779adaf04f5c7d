"""patches/retraction.py: a retracted request's KV goes into the (hierarchical) prefix cache.

Runs SGLang's own ``release_req`` (the retraction path) with the plugin's hooks applied, over a
recording tree cache, and checks which ``is_insert`` reaches ``cache_finished_req``.
"""

import inspect

import pytest

from test_plugin import _model_dir, _server_args, sglang_loaded  # noqa: F401


class _Req:
    def __init__(self):
        self.req_pool_idx, self.kv, self.retracted = 3, object(), False

    def effective_kv_committed_len(self):
        return 7

    def finished(self):
        return False

    def reset_for_retract(self):
        self.retracted = True


class _TreeCache:
    def __init__(self):
        self.calls = []

    def cache_finished_req(self, req, is_insert, kv_len_to_handle):
        self.calls.append((is_insert, kv_len_to_handle))
        req.req_pool_idx = req.kv = None

    def is_chunk_cache(self):
        return True  # nothing to evict in this fake


def _retract(server_args):
    from sglang.srt.managers import schedule_batch

    req, tree = _Req(), _TreeCache()
    schedule_batch.release_req(req=req, remaing_req_count=1, server_args=server_args,
                               req_to_token_pool=None, token_to_kv_pool_allocator=None,
                               tree_cache=tree, hisparse_coordinator=None)
    assert req.retracted
    return tree.calls


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path, "Qwen3ForCausalLM")


@pytest.mark.parametrize("kwargs, inserted", [
    (dict(enable_hierarchical_cache=True), True),
    (dict(enable_hierarchical_cache=True, sparsespec_disable_kv_offload=True), False),
    (dict(), False),  # no host pool to keep it in: SGLang's retract-and-recompute
    (dict(enable_hierarchical_cache=True, speculative_algorithm=None), False),  # plain SGLang
])
def test_retracted_kv_is_inserted_only_for_sparsespec_with_hicache(sglang_loaded, model_dir,  # noqa: F811
                                                                    kwargs, inserted):
    server_args = _server_args(model_dir, **kwargs)
    assert _retract(server_args) == [(inserted, 7)]


def test_other_release_paths_are_untouched(sglang_loaded):  # noqa: F811
    from sglang.srt.mem_cache import common

    req, tree = _Req(), _TreeCache()
    common.release_kv_cache(req, tree, is_insert=False)
    assert tree.calls == [(False, 7)]


def test_sglang_retraction_contract(sglang_loaded):  # noqa: F811
    """Fails when SGLang changes what the hooks rely on."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache import common

    release_req = inspect.unwrap(schedule_batch.release_req)
    params = inspect.signature(release_req).parameters
    assert {"req", "server_args", "tree_cache"} <= set(params)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert "release_kv_cache(req, tree_cache, is_insert=False)" in inspect.getsource(release_req)
    assert list(inspect.signature(inspect.unwrap(common.release_kv_cache)).parameters) == [
        "req", "tree_cache", "is_insert"]
    # ScheduleBatch.retract_decode releases through the module-level function.
    assert "release_req(" in inspect.getsource(schedule_batch.ScheduleBatch.release_req)
