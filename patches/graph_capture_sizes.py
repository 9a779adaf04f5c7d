"""Hook on ``get_batch_sizes_to_capture``: the row counts of the SPARSESPEC draft / unified graphs.

SGLang's ``DecodeCudaGraphRunner`` captures the server's decode batch sizes, read from
``get_batch_sizes_to_capture``, defined in ``base_cuda_graph_runner`` and imported by name into
``decode_cuda_graph_runner``. The hook targets the name the runner resolves at call time (the
``decode_cuda_graph_runner`` module global): a scheduler process imports that module before the
plugin's hooks are applied, so patching the defining module alone would never reach the runner. A unified pass has up to ~2x as many single-token rows as the
batch has requests, so ``sparsespec_sglang.draft_graph`` captures its own list of row counts.
Target (AROUND): inside :func:`capturing` it returns that list (and no torch.compile sizes);
everywhere else, and on every other server, SGLang's own sizes. The sizes live in a context
variable set only while the plugin builds its runner, so no other runner can see them.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence

from sparsespec_sglang.compat import HookType

from sparsespec_sglang.patches import register_once

_sizes: contextvars.ContextVar[Optional[list[int]]] = contextvars.ContextVar(
    "sparsespec_graph_capture_sizes", default=None)


@contextlib.contextmanager
def capturing(sizes: Optional[Sequence[int]]) -> Iterator[None]:
    """Runners built inside capture ``sizes`` (None: SGLang's own sizes)."""
    token = _sizes.set(None if sizes is None else sorted(set(sizes)))
    try:
        yield
    finally:
        _sizes.reset(token)


def get_batch_sizes_to_capture(original: Callable, model_runner: Any, *args: Any,
                               **kwargs: Any) -> tuple[list[int], list[int]]:
    sizes = _sizes.get()
    if sizes is None:
        return original(model_runner, *args, **kwargs)
    return list(sizes), []


HOOKS = (
    ("get_batch_sizes_to_capture",
     get_batch_sizes_to_capture, HookType.AROUND),
)


def register() -> None:
    register_once(__name__, HOOKS)
