"""Hook on ``Scheduler.maybe_init_draft_worker``: no NGRAM corpus manager on a SPARSESPEC server.

SPARSESPEC answers ``is_ngram()`` True (``sparsespec_sglang.algorithm.SparseSpecAlgo`` says why), and
``maybe_init_draft_worker`` wraps every ``is_ngram()`` worker in NGRAM's ``ExternalCorpusManager``
(external SAM corpora for n-gram drafting). SPARSESPEC drafts with the target model and has no
corpus, so the manager is dropped (AFTER): corpus requests then get SGLang's own "Ngram speculative
decoding is not enabled" reply instead of reaching a worker that has no corpus methods.
Every other server is untouched.
"""

from __future__ import annotations

from typing import Any

from sparsespec_sglang.compat import HookType

from sparsespec_sglang.patches import register_hooks
from sparsespec_sglang.validation import is_sparsespec


def maybe_init_draft_worker(result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
    if is_sparsespec(scheduler.server_args):
        scheduler.external_corpus_manager = None
    return result


HOOKS = (
    ("Scheduler.maybe_init_draft_worker", maybe_init_draft_worker,
     HookType.AFTER),
)


def register() -> None:
    register_hooks(HOOKS)
