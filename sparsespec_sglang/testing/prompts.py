"""The reasoning prompt set and the chat / few-shot prompts built from it.

Why: SparseSpec's acceptance depends on the context length (the sparse budget is a fraction
of it) and on the text being real reasoning. The paper's prompts are short and its outputs
long; on small CPU-friendly models we get long contexts instead by prepending worked
solutions (GSM8K-style chains of thought) before the question, in the model's own chat format.

The prompt file is `benchmarks/prompts/reasoning_prompts.jsonl` (made by
`scripts/make_prompts.py`; `$SPARSESPEC_PROMPTS` points elsewhere). Each line has
`id`, `task`, `question`, `answer` and `solution` (a worked solution, or null).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["default_prompts_path", "load_prompts", "chat_prompt", "few_shot_prompt", "count_tokens"]

_REPO_PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "prompts" / "reasoning_prompts.jsonl"


def default_prompts_path() -> Path:
    """`$SPARSESPEC_PROMPTS` if set, else the repository's committed prompt file."""
    env = os.environ.get("SPARSESPEC_PROMPTS")
    return Path(env) if env else _REPO_PROMPTS


def load_prompts(path: Path | str | None = None, task: str | None = None) -> list[dict[str, Any]]:
    """All prompt records (optionally only those of `task`, e.g. "gsm_symbolic" or "codeio")."""
    path = Path(path) if path is not None else default_prompts_path()
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt file {path} not found: run scripts/make_prompts.py or set SPARSESPEC_PROMPTS"
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if task is not None:
        records = [r for r in records if r["task"] == task]
        if not records:
            raise ValueError(f"no prompts of task {task!r} in {path}")
    return records


def count_tokens(tokenizer, text: str) -> int:
    """Token count of a rendered prompt (the chat template already wrote the special tokens)."""
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def _render(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt(tokenizer, question: str, system: str | None = None) -> str:
    """`question` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return _render(tokenizer, messages)


def few_shot_prompt(
    tokenizer,
    n_shots: int | None,
    question: str,
    target_tokens: int | None,
    examples: Sequence[dict[str, Any]] | None = None,
) -> str:
    """A chat prompt of worked examples (user: question, assistant: solution) followed by `question`.

    Examples are taken in order from `examples` (default: every record of the prompt file that
    has a worked solution), skipping `question` itself. Shots are added while the prompt stays
    within `target_tokens` and there are fewer than `n_shots` of them (None = no limit on that
    side), so the result is at most `target_tokens` long and within one example of it.
    Raises ValueError when the examples run out before `target_tokens` is within reach.
    """
    if n_shots is None and target_tokens is None:
        raise ValueError("few_shot_prompt needs n_shots or target_tokens (or both)")
    pool = [e for e in (examples if examples is not None else load_prompts()) if e.get("solution")]
    pool = [e for e in pool if e["question"] != question]
    final = [{"role": "user", "content": question}]
    shots: list[dict[str, str]] = []
    prompt = _render(tokenizer, final)
    limit = len(pool) if n_shots is None else min(n_shots, len(pool))
    if n_shots is not None and n_shots > len(pool):
        raise ValueError(f"n_shots={n_shots} but only {len(pool)} worked examples are available")
    for example in pool[:limit]:
        turn = [{"role": "user", "content": example["question"]}, {"role": "assistant", "content": example["solution"]}]
        candidate = _render(tokenizer, shots + turn + final)
        if target_tokens is not None and count_tokens(tokenizer, candidate) > target_tokens:
            return prompt
        shots += turn
        prompt = candidate
    if target_tokens is not None and n_shots is None:
        raise ValueError(
            f"the {len(pool)} worked examples give only {count_tokens(tokenizer, prompt)} tokens, "
            f"short of target_tokens={target_tokens}"
        )
    return prompt
