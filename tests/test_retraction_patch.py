"""patches/retraction.py: a retracted request's KV goes into the (hierarchical) prefix cache.

Runs SGLang's own ``release_req`` (the retraction path) with the plugin's hooks applied, over a
recording tree cache (which ``is_insert`` reaches ``cache_finished_req``) and over SGLang's real
request pool, token allocator and radix cache on CPU (no slot leaked, the KV found again).
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
    # A server without SPARSESPEC keeps it only when asked (--sparsespec-keep-retracted-kv).
    (dict(enable_hierarchical_cache=True, speculative_algorithm=None,
          sparsespec_keep_retracted_kv=True), True),
    (dict(enable_hierarchical_cache=True, speculative_algorithm="NGRAM",
          sparsespec_keep_retracted_kv=True), True),
    (dict(enable_hierarchical_cache=True, speculative_algorithm="NGRAM"), False),
])
def test_retracted_kv_is_inserted_with_hicache_for_sparsespec_or_when_asked(sglang_loaded, model_dir,  # noqa: F811
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


class _LiveReq(_Req):
    """What SGLang's release path reads of a decoding request, over real pools."""

    def __init__(self, pool_idx, tokens, committed, allocated):
        self.req_pool_idx, self.retracted = pool_idx, False
        self.origin_input_ids, self.output_ids = tokens[:8], tokens[8:committed]
        self.extra_key, self.cache_protected_len, self.last_node, self.priority = None, 0, None, 0
        self.mamba_pool_idx, self._committed = None, committed
        self.kv = type("KV", (), {"kv_allocated_len": allocated})()

    def effective_kv_committed_len(self):
        return self._committed


@pytest.mark.parametrize("keep, kwargs", [
    (True, dict(enable_hierarchical_cache=True)),
    (False, dict()),
    # Servers without SPARSESPEC: kept only with --sparsespec-keep-retracted-kv.
    (True, dict(enable_hierarchical_cache=True, speculative_algorithm=None,
                sparsespec_keep_retracted_kv=True)),
    (False, dict(enable_hierarchical_cache=True, speculative_algorithm=None)),
    (True, dict(enable_hierarchical_cache=True, speculative_algorithm="NGRAM",
                sparsespec_keep_retracted_kv=True)),
])
def test_retraction_over_sglangs_radix_cache_leaks_nothing_and_keeps_the_kv(sglang_loaded, model_dir,  # noqa: F811
                                                                           keep, kwargs):
    """SGLang's own ReqToTokenPool, token allocator and RadixCache on CPU: a retracted request
    (with speculative slots allocated past its committed length on a speculative server) gives
    every slot back either to the allocator or to the cache as evictable, re-admission finds its
    KV as a prefix when kept (SPARSESPEC with HiCache, or another server with HiCache and
    --sparsespec-keep-retracted-kv), and evicting the cache returns the pool to full."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams, MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
    from sglang.srt.runtime_context import get_context

    import torch

    server_args = _server_args(model_dir, **kwargs)
    size = 64
    req_pool = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size, torch.bfloat16, "cpu", None, need_sort=False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=req_pool,
                                      token_to_kv_pool_allocator=allocator, page_size=1))
    # A speculative server has 9 slots reserved for the next cycle's drafts + verify (plain: none).
    committed = 20
    allocated = committed + (0 if server_args.speculative_algorithm is None else 9)
    slots = allocator.alloc(allocated)
    req = _LiveReq(req_pool.free_slots.pop(0), list(range(100, 100 + committed)), committed, allocated)
    req_pool.req_to_token[req.req_pool_idx, :allocated] = slots.to(torch.int32)
    assert allocator.available_size() == size - allocated

    override = get_context().override_server_args(**vars(server_args))
    override.install()
    try:
        schedule_batch.release_req(req=req, remaing_req_count=0, server_args=server_args,
                                   req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                                   tree_cache=tree, hisparse_coordinator=None)
    finally:
        override.restore()
    assert req.retracted and req.req_pool_idx is None
    kept = committed if keep else 0
    assert tree.evictable_size() == kept
    assert allocator.available_size() + tree.evictable_size() == size  # nothing leaked
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(list(range(100, 100 + committed)), None)))
    assert len(match.device_indices) == kept
    if keep:
        assert match.device_indices.tolist() == slots[:committed].tolist()
    tree.evict(EvictParams(num_tokens=size))
    assert allocator.available_size() == size
