"""patches/retraction.py: a retracted request's KV goes into the (hierarchical) prefix cache.

Runs SGLang's own ``release_req`` (the retraction path) with the plugin's hooks applied, over a
real decoding ``Req``, SGLang's real request pool, token allocator and the radix tree SGLang builds
for a plain model, on CPU, with the server's ``ServerArgs`` published as in a scheduler process:
no slot leaked, and the KV found again exactly when the server keeps it.
"""

import inspect
import logging
from array import array
from types import SimpleNamespace

import pytest

from sparsespec_sglang import compat
from test_kv_reserve_patch import published
from test_plugin import _model_dir, _server_args, sglang_loaded  # noqa: F401


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path, "Qwen3ForCausalLM")


SIZE, COMMITTED = 64, 20
TOKENS = list(range(100, 100 + COMMITTED))


def _pools():
    """SGLang's request pool, token allocator and the radix tree it builds for a plain model:
    ``RadixCache`` up to 0.5.18, a full-attention ``UnifiedRadixCache`` from 0.5.19."""
    import torch
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

    req_pool = ReqToTokenPool(size=2, max_context_len=64, device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(SIZE, torch.bfloat16, "cpu", None, need_sort=False)
    params = dict(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator, page_size=1)
    if compat.since("0.5.19"):
        from sglang.srt.mem_cache.unified_cache.components import ComponentType
        from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

        return req_pool, allocator, UnifiedRadixCache(CacheInitParams(**params, tree_components=(ComponentType.FULL,)))
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return req_pool, allocator, RadixCache(CacheInitParams(**params))


def _admit(req, tree) -> None:
    """What SGLang's scheduler does when it admits a request: match its prompt in the tree and lock
    the matched node, which releasing the request unlocks (0.5.19 unlocks ``last_node`` whether or
    not it was locked). The lock is ``inc_lock_ref`` up to 0.5.21, its receipt kept on the request
    from 0.5.20, and a ``TreeLock`` on the request from 0.5.22."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    req.last_node = tree.match_prefix(MatchPrefixParams(key=RadixKey(req.origin_input_ids, None))).last_device_node
    if compat.since("0.5.22"):
        req.lock = tree.lock(req.last_node)
    elif compat.since("0.5.20"):
        req.lock_receipt = tree.inc_lock_ref(req.last_node).to_dec_params()
    else:
        tree.inc_lock_ref(req.last_node)


def _decoding_req(req_pool, allocator, allocated, tree):
    """A real ``Req`` in decode, admitted into ``tree``: ``allocated`` KV slots in its row, the first
    COMMITTED written (its prompt and outputs so far), as SGLang's allocation leaves it; the KV
    bookkeeping sits on the request up to 0.5.18 and on ``req.kv`` from 0.5.19."""
    import torch
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req("r0", "", array("q", TOKENS[:8]), SamplingParams())
    _admit(req, tree)
    req.output_ids = array("q", TOKENS[8:])
    slots = allocator.alloc(allocated)
    req_pool.alloc([req])
    if compat.since("0.5.19"):
        req.kv.kv_committed_len, req.kv.kv_allocated_len = COMMITTED, allocated
        row = req.kv.req_pool_idx
    else:
        from sglang.srt.managers.schedule_batch import ReqKvInfo

        req.kv = ReqKvInfo(kv_allocated_len=allocated, swa_evicted_seqlen=0)
        req.kv_committed_len = COMMITTED
        row = req.req_pool_idx
    req_pool.req_to_token[row, :allocated] = slots.to(torch.int32)
    return req, slots


def _holds_kv(req) -> bool:
    return req.kv.holds_kv if compat.since("0.5.19") else req.req_pool_idx is not None


def _matched(tree):
    """KV slots the tree finds for the request's tokens (a re-admitted request's prefix hit)."""
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array("q", TOKENS), None)))
    if compat.since("0.5.22"):
        return tree.path_device_indices(match.last_device_node)[:match.device_prefix_len].tolist()
    return match.device_indices.tolist()


def _release_kwargs(server_args) -> dict:
    """What the retraction passes ``release_req`` besides the request and pools: the server's
    arguments up to 0.5.18 (from 0.5.19 SGLang reads the published ones)."""
    return {} if compat.since("0.5.19") else {"server_args": server_args}


@pytest.mark.parametrize("keep, kwargs", [
    (True, dict(enable_hierarchical_cache=True)),
    (False, dict(enable_hierarchical_cache=True, sparsespec_disable_kv_offload=True)),
    (False, dict()),  # no host pool to keep it in: SGLang's retract-and-recompute
    (False, dict(enable_hierarchical_cache=True, speculative_algorithm=None)),  # plain SGLang
    # A server without SPARSESPEC keeps it only when asked (--sparsespec-keep-retracted-kv).
    (True, dict(enable_hierarchical_cache=True, speculative_algorithm=None, sparsespec_keep_retracted_kv=True)),
    (True, dict(enable_hierarchical_cache=True, speculative_algorithm="NGRAM", sparsespec_keep_retracted_kv=True)),
    (False, dict(enable_hierarchical_cache=True, speculative_algorithm="NGRAM")),
])
def test_retraction_over_sglangs_radix_cache_leaks_nothing_and_keeps_the_kv(sglang_loaded, model_dir,  # noqa: F811
                                                                           keep, kwargs):
    """A retracted request (with speculative slots allocated past its committed length on a
    speculative server) gives every slot back either to the allocator or to the tree as
    evictable; re-admission finds its KV as a prefix exactly when kept (SPARSESPEC with HiCache
    unless --sparsespec-disable-kv-offload, another server with HiCache and
    --sparsespec-keep-retracted-kv); evicting the tree returns the pool to full."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    from sparsespec_sglang import offload
    from sparsespec_sglang.patches import retraction

    server_args = _server_args(model_dir, **kwargs)
    req_pool, allocator, tree = _pools()
    # A speculative server has 9 slots reserved for the next cycle's drafts + verify (plain: none).
    allocated = COMMITTED + (0 if server_args.speculative_algorithm is None else 9)
    req, slots = _decoding_req(req_pool, allocator, allocated, tree)
    assert allocator.available_size() == SIZE - allocated

    with published(server_args):
        schedule_batch.release_req(req=req, remaing_req_count=0, req_to_token_pool=req_pool,
                                   token_to_kv_pool_allocator=allocator, tree_cache=tree,
                                   hisparse_coordinator=None, **_release_kwargs(server_args))
    assert req.is_retracted and not _holds_kv(req)
    assert not hasattr(req, retraction.KEEP_KV_ATTR)  # the mark lives for the one release_req call
    assert (offload.stats_of(tree) is not None) is keep  # copy timing starts with the tree's first kept request
    kept = COMMITTED if keep else 0
    assert tree.evictable_size() == kept
    assert allocator.available_size() + tree.evictable_size() == SIZE  # nothing leaked
    assert _matched(tree) == slots[:kept].tolist()
    tree.evict(EvictParams(num_tokens=SIZE))
    assert allocator.available_size() == SIZE


def test_other_release_paths_are_untouched(sglang_loaded, model_dir):  # noqa: F811
    """A release outside the retraction (a finished request, an abort) keeps SGLang's choice, even
    on a server that keeps retracted KV."""
    from sglang.srt.mem_cache import common

    server_args = _server_args(model_dir, enable_hierarchical_cache=True)
    req_pool, allocator, tree = _pools()
    req, _ = _decoding_req(req_pool, allocator, COMMITTED + 9, tree)
    (keyword,) = compat.keeping_release_kwargs()
    with published(server_args):
        common.release_kv_cache(req, tree, **{keyword: False})
    assert not _holds_kv(req) and tree.evictable_size() == 0 and allocator.available_size() == SIZE


def test_a_mamba_tree_keeps_a_running_requests_kv_only_up_to_0_5_21(sglang_loaded, model_dir, caplog):  # noqa: F811
    """From 0.5.22 SGLang hands a tree that holds mamba state only a finished request's state: the
    hook leaves such a retraction to SGLang (recompute) and says so once per tree cache."""
    from sparsespec_sglang.patches import retraction

    server_args = _server_args(model_dir, enable_hierarchical_cache=True)
    length = "owned_kv_len" if compat.since("0.5.21") else "effective_kv_committed_len"
    req = SimpleNamespace(rid="r0", **{length: lambda: COMMITTED})
    kept = []
    mamba_tree, other_mamba_tree, plain_tree = (
        SimpleNamespace(supports_mamba=lambda mamba=mamba: mamba) for mamba in (True, True, False))
    with published(server_args), caplog.at_level(logging.INFO, logger=retraction.__name__):
        for tree in (mamba_tree, mamba_tree, plain_tree, other_mamba_tree):
            retraction.release_req(lambda **kw: kept.append(getattr(kw["req"], retraction.KEEP_KV_ATTR, False)),
                                   req=req, tree_cache=tree, **_release_kwargs(server_args))
    mamba_keeps = not compat.since("0.5.22")
    assert kept == [mamba_keeps, mamba_keeps, True, mamba_keeps]
    assert not hasattr(req, retraction.KEEP_KV_ATTR)
    warnings = [r.getMessage() for r in caplog.records
                if r.name == retraction.__name__ and r.levelno == logging.WARNING]
    assert len(warnings) == (0 if mamba_keeps else 2)  # once per mamba tree
    assert caplog.text.count(f"retracted request r0 keeps its {COMMITTED} KV tokens") == (4 if mamba_keeps else 1)


def test_sglang_retraction_contract(sglang_loaded):  # noqa: F811
    """Fails when SGLang changes what the hooks rely on, per release."""
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache import common

    since_19, since_22 = compat.since("0.5.19"), compat.since("0.5.22")
    release_req = inspect.unwrap(schedule_batch.release_req)
    params = inspect.signature(release_req).parameters
    assert {"req", "tree_cache"} <= set(params)
    assert ("server_args" in params) is not since_19  # from 0.5.19 the hook reads the published ones
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    # The retraction frees the KV without inserting it, then evicts from the tree right away.
    (keyword,) = compat.keeping_release_kwargs()
    source = inspect.getsource(release_req)
    call = f"release_kv_cache(req, tree_cache, {keyword}=False)"
    assert call in source and source.index(call) < source.index("evict_from_tree_cache(")
    release_kv_cache = inspect.unwrap(common.release_kv_cache)
    params = inspect.signature(release_kv_cache).parameters
    assert list(params) == ["req", "tree_cache", keyword]
    assert (params[keyword].kind is inspect.Parameter.KEYWORD_ONLY) is since_22
    # From 0.5.22 a checkpoint into a tree with mamba state must come from a finished request.
    assert ("req.finished() or not tree_cache.supports_mamba()" in inspect.getsource(release_kv_cache)) is since_22
    length = "owned_kv_len" if compat.since("0.5.21") else "effective_kv_committed_len"
    assert f"req.{length}()" in inspect.getsource(release_kv_cache)
    # ScheduleBatch.retract_decode releases through the module-level function.
    assert "self.release_req(" in inspect.getsource(schedule_batch.ScheduleBatch.retract_decode)
    assert "release_req(" in inspect.getsource(schedule_batch.ScheduleBatch.release_req)
