"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang's ``load_plugins()`` calls :func:`register` once per process (launcher,
Engine, scheduler, detokenizer); it registers the SPARSESPEC algorithm
(``sparsespec_sglang.algorithm``), the ``sparsespec`` attention backend and the
hooks under ``patches/``. On an SGLang release outside the supported range
(``sparsespec_sglang.compat``) it registers only a SPARSESPEC that refuses to
start with one line naming the installed and the supported versions, and leaves
every other server untouched.

Importing this module (and the configuration checks it names) loads neither torch nor Triton;
:func:`register` imports SGLang's registries, which bring torch.
"""

from __future__ import annotations

import logging

from sparsespec_sglang import compat
from sparsespec_sglang.config import ALGORITHM_NAME, ATTENTION_BACKEND_NAME

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point: idempotent, so tests and repeated ``load_plugins()`` are safe."""
    try:
        compat.check_supported()
    except compat.UnsupportedSGLangError as e:
        _register_refusal(str(e))
        return
    from sparsespec_sglang.algorithm import SparseSpecAlgo, create_attention_backend, worker_factory
    from sparsespec_sglang.compat import SpeculativeAlgorithm, get_spec
    from sparsespec_sglang.validation import validate_server_args

    if get_spec(ALGORITHM_NAME) is None:
        SpeculativeAlgorithm.register(
            ALGORITHM_NAME,
            supports_overlap=True,
            validate_server_args=validate_server_args,
            spec_class=SparseSpecAlgo,
        )(worker_factory)

    from sparsespec_sglang.compat import (
        ATTENTION_BACKEND_CHOICES,
        ATTENTION_BACKENDS,
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
        register_attention_backend,
    )

    if ATTENTION_BACKEND_NAME not in ATTENTION_BACKENDS:
        register_attention_backend(ATTENTION_BACKEND_NAME)(create_attention_backend)
    if ATTENTION_BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([ATTENTION_BACKEND_NAME])
    if ATTENTION_BACKEND_NAME not in DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        # Its verify runs SGLang's deterministic decode kernel per token under
        # --enable-deterministic-inference (sparsespec_sglang/deterministic.py).
        DETERMINISTIC_ATTENTION_BACKEND_CHOICES.append(ATTENTION_BACKEND_NAME)

    from sparsespec_sglang.patches import corpus_manager as corpus_manager_patch
    from sparsespec_sglang.patches import graph_capture_sizes as graph_capture_sizes_patch
    from sparsespec_sglang.patches import hicache_io as hicache_io_patch
    from sparsespec_sglang.patches import kv_reserve as kv_reserve_patch
    from sparsespec_sglang.patches import retraction as retraction_patch
    from sparsespec_sglang.patches import server_args as server_args_patch

    server_args_patch.register()
    retraction_patch.register()
    kv_reserve_patch.register()
    hicache_io_patch.register()
    corpus_manager_patch.register()
    graph_capture_sizes_patch.register()
    logger.info("sparsespec-sglang: registered %s", ALGORITHM_NAME)


def _register_refusal(message: str) -> None:
    """On an unsupported SGLang: a SPARSESPEC whose argument check raises ``message`` (one line
    through the launcher's error hook), so the launch stops before any weights load. Nothing else
    is hooked. If even that cannot be registered in this release, one warning line says why."""
    from sparsespec_sglang.patches import server_args as server_args_patch

    def refuse(*_: object) -> None:
        raise compat.UnsupportedSGLangError(message)

    try:
        from sparsespec_sglang.compat import SpeculativeAlgorithm, get_spec

        if get_spec(ALGORITHM_NAME) is None:
            SpeculativeAlgorithm.register(ALGORITHM_NAME, validate_server_args=refuse)(refuse)
        server_args_patch.register_error_hook()
    except (ImportError, AttributeError, TypeError) as e:
        logger.warning("sparsespec-sglang is inactive: %s (%s)", message, e)
        return
    logger.warning("sparsespec-sglang is inactive: %s", message)
