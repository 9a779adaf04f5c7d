"""patches/kv_reserve.py: a unified SPARSESPEC server reserves the KV its cross-pass drafts write.

Calls SGLang's own sizing functions (and the names the scheduler and the spec-v2 decode prep
imported) with the plugin's hooks applied; fails if SGLang renames or reshapes them.
"""

import inspect

import pytest

from test_plugin import _model_dir, _server_args, sglang_loaded  # noqa: F401


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path, "Qwen3ForCausalLM")


@pytest.mark.parametrize("kwargs, reserve", [
    (dict(sparsespec_schedule="unified"), 3 * 9),  # k = 8 by default
    (dict(sparsespec_schedule="unified", speculative_num_steps=4), 3 * 5),
    (dict(sparsespec_schedule="lockstep"), 2 * 9),  # SGLang's own 2 (k + 1)
    (dict(speculative_algorithm=None), 1 * 2),  # plain SGLang: untouched
])
def test_reserve_per_decode(sglang_loaded, model_dir, kwargs, reserve):  # noqa: F811
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache import allocation_sizing
    from sglang.srt.speculative import eagle_utils

    sa = _server_args(model_dir, **kwargs)
    for fn in (allocation_sizing.get_alloc_reserve_per_decode,
               schedule_batch.get_alloc_reserve_per_decode, eagle_utils.get_alloc_reserve_per_decode):
        assert fn(sa) == reserve
    extra = allocation_sizing.get_req_to_token_extra_context_len(sa)
    if kwargs.get("sparsespec_schedule") == "unified":
        assert extra >= reserve + 4
    else:
        assert extra < 3 * 9


def test_sglang_sizing_contract(sglang_loaded):  # noqa: F811
    from sglang.srt.mem_cache import allocation_sizing

    assert list(inspect.signature(allocation_sizing.get_alloc_reserve_per_decode).parameters) == [
        "server_args"]
    assert list(inspect.signature(allocation_sizing.get_req_to_token_extra_context_len).parameters) == [
        "server_args"]
