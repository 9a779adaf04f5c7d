"""patches/kv_reserve.py: a unified SPARSESPEC server reserves the KV its cross-pass drafts write.

Calls SGLang's own sizing functions (and the names the scheduler and the spec-v2 decode prep
imported) with the plugin's hooks applied, the way the scheduler process calls them (with the
server's ``ServerArgs`` published); fails if SGLang renames or reshapes them.
"""

import contextlib
import inspect

import pytest

from sparsespec_sglang import compat
from test_plugin import _model_dir, _server_args, sglang_loaded  # noqa: F401


@contextlib.contextmanager
def published(server_args):
    """``server_args`` as this process's published ``ServerArgs`` (as in a scheduler process),
    and whatever was published before restored afterwards."""
    from sglang.srt.runtime_context import get_context

    override = get_context().override_server_args()  # saves the context; restore() puts it back
    override.install()
    get_context().set_server_args(server_args)
    try:
        yield
    finally:
        override.restore()


@pytest.fixture
def model_dir(tmp_path):
    return _model_dir(tmp_path, "Qwen3ForCausalLM")


@pytest.mark.parametrize("kwargs, reserve, extra", [
    # k = 8 by default; SGLang's own headroom is 4 + (k + 1), the hook's 4 + reserve + page - 1.
    (dict(sparsespec_schedule="unified"), 3 * 9, 4 + 3 * 9),
    (dict(sparsespec_schedule="unified", speculative_num_steps=4), 3 * 5, 4 + 3 * 5),
    (dict(sparsespec_schedule="unified", page_size=16), 3 * 9, 4 + 3 * 9 + 15),
    (dict(sparsespec_schedule="lockstep"), 2 * 9, 4 + 9),  # SGLang's own 2 (k + 1)
    (dict(sparsespec_schedule="lockstep", page_size=16), 2 * 9, 2 * 9 + 15),
    (dict(speculative_algorithm=None), 1 * 2, 4),  # plain SGLang: untouched
])
def test_reserve_per_decode(sglang_loaded, model_dir, kwargs, reserve, extra):  # noqa: F811
    from sglang.srt.managers import schedule_batch
    from sglang.srt.mem_cache import allocation_sizing
    from sglang.srt.speculative import eagle_utils

    sa = _server_args(model_dir, **kwargs)
    # The decode path calls the reserve without arguments; up to 0.5.17 a caller may pass the
    # server's arguments instead.
    forms = [()] if compat.since("0.5.18") else [(), (sa,)]
    with published(sa):
        for args in forms:
            for fn in (allocation_sizing.get_alloc_reserve_per_decode,
                       schedule_batch.get_alloc_reserve_per_decode, eagle_utils.get_alloc_reserve_per_decode):
                assert fn(*args) == reserve
        assert allocation_sizing.get_req_to_token_extra_context_len(*forms[-1]) == extra


def test_sglang_sizing_contract(sglang_loaded):  # noqa: F811
    """Fails when SGLang changes what the hooks rely on, per release."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch
    from sglang.srt.mem_cache import allocation_sizing, kv_cache_configurator
    from sglang.srt.speculative import eagle_utils

    since_18 = compat.since("0.5.18")
    params = [] if since_18 else ["server_args"]
    reserve, extra = (inspect.unwrap(allocation_sizing.get_alloc_reserve_per_decode),
                      inspect.unwrap(allocation_sizing.get_req_to_token_extra_context_len))
    assert list(inspect.signature(reserve).parameters) == params
    assert list(inspect.signature(extra).parameters) == params
    # The decode memory check and the spec-v2 decode prep take the reserve without arguments.
    assert "get_alloc_reserve_per_decode()" in inspect.getsource(
        ScheduleBatch._new_tokens_required_next_decode_spec_v2)
    assert "get_alloc_reserve_per_decode()" in inspect.getsource(eagle_utils.eagle_prepare_for_decode)
    # The pool sizing asks for the row headroom (with the server's arguments up to 0.5.17).
    assert ("get_req_to_token_extra_context_len()" if since_18 else
            "get_req_to_token_extra_context_len(self.server_args)") in inspect.getsource(kv_cache_configurator)
    # SGLang's own headroom rounds the reserve up by the page size compat.alloc_page_size reads.
    page = ("get_alloc_page_size()" if compat.since("0.5.19") else
            "get_schedule().page_size" if since_18 else "server_args.page_size")
    assert page in inspect.getsource(extra)
    assert "get_alloc_reserve_per_decode(" in inspect.getsource(extra)
