"""Prompt sources: normalise user-given prompts, or name the built-in ones.

The default prompts, openings of human-written movie-review sentences, live with their task:
:func:`textgym.tasks.sentiment.movie_review_prompts` (also reachable here).
"""

from __future__ import annotations

from typing import Any

from textgym.chat import check_messages, is_messages
from textgym.tasks.sentiment import movie_review_prompts

__all__ = ["as_prompt_list", "movie_review_prompts"]


def as_prompt_list(prompts: Any = None, column: str = "prompt", allow_messages: bool = False) -> list:
    """Normalise any prompt source to a non-empty list of prompts.

    A prompt is a non-empty string or, with ``allow_messages``, a conversation: a list of
    ``{"role": str, "content": str}`` messages (see :mod:`textgym.chat`).

    :param prompts: ``None`` (the default: :func:`movie_review_prompts` ``"train"``);
        ``"movie_reviews:train"`` / ``"movie_reviews:test"``; a list/tuple or any finite iterable of
        strings (materialised once, so seeded draws are reproducible); or a ``datasets.Dataset``
        (anything with ``column_names``), whose ``column`` is used.
    :param column: column holding the prompt text when ``prompts`` is a dataset.
    :param allow_messages: accept conversations (chat mode).
    :return: the prompts as a list of ``str`` (and, with ``allow_messages``, lists of message dicts).
    :raises ValueError: the source is empty, a single plain string, a dataset without ``column``,
        or holds an empty or non-string prompt, a malformed conversation, or a conversation
        without ``allow_messages`` (the message says to pass ``chat_template=True``).
    """
    if prompts is None:
        prompts = "movie_reviews:train"
    if isinstance(prompts, str):
        name, _, split = prompts.partition(":")
        if name != "movie_reviews":
            raise ValueError(
                f"prompts={prompts!r} is a single string; pass a list of prompts, e.g. [{prompts!r}], "
                "or 'movie_reviews:train' / 'movie_reviews:test' for the built-in prompts"
            )
        return movie_review_prompts(split or "train")
    if hasattr(prompts, "column_names"):
        if column not in prompts.column_names:
            raise ValueError(
                f"dataset has no column {column!r} (columns: {prompts.column_names}); "
                "pass prompt_column=<the column with the prompt text>"
            )
        prompts = prompts[column]
    items = list(prompts)
    if not items:
        raise ValueError("the prompt source is empty: give at least one prompt")
    for i, item in enumerate(items):
        if is_messages(item):
            if not allow_messages:
                raise ValueError(f"prompt #{i} is a list of chat messages; pass chat_template=True to render "
                                 "conversations through the tokenizer's chat template")
            check_messages(item, f"prompt #{i}")
            continue
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"prompt #{i} is {item!r}: every prompt must be a non-empty string"
                             + (" or a list of {'role', 'content'} messages" if allow_messages else ""))
    return items

