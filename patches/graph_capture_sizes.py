"""Hook on ``get_batch_sizes_to_capture``: the row counts of the SPARSESPEC draft / unified graphs.

SGLang's ``DecodeCudaGraphRunner`` captures the server's decode batch sizes, read from
``get_batch_sizes_to_capture(model_runner, ...)``, defined in ``base_cuda_graph_runner`` and
imported by name into ``decode_cuda_graph_runner``. The hook targets the name the runner resolves
at call time (the ``decode_cuda_graph_runner`` module global): a scheduler process imports that
module before the plugin's hooks are applied, so patching the defining module alone would never
reach the runner. A unified pass has up to ~2x as many single-token rows as the batch has
requests, so ``sparsespec_sglang.forward_graphs`` captures its own list of row counts.
Target (AROUND): for a model runner inside :func:`capturing` it returns that list (and no
torch.compile sizes); for every other call, and on every other server, SGLang's own sizes.

The sizes ride on the model runner the hook receives (SGLang passes the runner, nothing else of
the caller's): ``CAPTURE_SIZES_ATTR``, set by :func:`capturing` while the plugin builds its
runner, read by the hook, removed when that construction returns or raises; so no other runner,
and no later call on the same model runner, sees them.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence

from sparsespec_sglang.compat import HookType

from sparsespec_sglang.patches import register_hooks

CAPTURE_SIZES_ATTR = "_sparsespec_capture_sizes"


@contextlib.contextmanager
def capturing(model_runner: Any, sizes: Optional[Sequence[int]]) -> Iterator[None]:
    """Graph runners built on ``model_runner`` inside capture ``sizes`` (None: SGLang's own sizes)."""
    if sizes is None:
        yield
        return
    setattr(model_runner, CAPTURE_SIZES_ATTR, sorted(set(sizes)))
    try:
        yield
    finally:
        delattr(model_runner, CAPTURE_SIZES_ATTR)


def get_batch_sizes_to_capture(original: Callable, model_runner: Any, *args: Any,
                               **kwargs: Any) -> tuple[list[int], list[int]]:
    sizes = getattr(model_runner, CAPTURE_SIZES_ATTR, None)
    if sizes is None:
        return original(model_runner, *args, **kwargs)
    return list(sizes), []


HOOKS = (
    ("get_batch_sizes_to_capture",
     get_batch_sizes_to_capture, HookType.AROUND),
)


def register() -> None:
    register_hooks(HOOKS)
