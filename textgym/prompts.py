"""Prompt sources: the default human-written movie-review openings, and user-given prompts."""

from __future__ import annotations

from typing import Any

from textgym import assets

PROMPT_WORDS = 6
"""Words taken from the start of a review sentence to make a prompt."""

MIN_SENTENCE_WORDS = 10
"""Sentences shorter than this are skipped, so a prompt never holds the whole sentence."""

SPLITS = ("train", "test")


def movie_review_prompts(split: str = "train") -> list[str]:
    """Opening words of human-written movie-review sentences (Hutto & Gilbert 2014; Pang & Lee 2005).

    Each prompt is the first :data:`PROMPT_WORDS` words of a sentence with at least
    :data:`MIN_SENTENCE_WORDS` words, e.g. ``"The Rock is destined to be"``.
    The split is fixed by sentence id (:func:`textgym.assets.is_held_out`): ``"test"`` holds the
    sentences the default reward model never saw in training.

    :param split: ``"train"`` (about 6.9k prompts) or ``"test"`` (about 1.7k, for evaluation).
    :return: prompts in file order.
    :raises ValueError: unknown split.
    :raises textgym.assets.AssetError: the sentences could not be fetched.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_test = split == "test"
    prompts = []
    for sentence in assets.movie_review_sentences():
        words = sentence.text.split()
        if len(words) >= MIN_SENTENCE_WORDS and assets.is_held_out(sentence.id) == want_test:
            prompts.append(" ".join(words[:PROMPT_WORDS]))
    return prompts


def as_prompt_list(prompts: Any = None, column: str = "prompt") -> list[str]:
    """Normalise any prompt source to a non-empty list of non-empty strings.

    :param prompts: ``None`` (the default: :func:`movie_review_prompts` ``"train"``);
        ``"movie_reviews:train"`` / ``"movie_reviews:test"``; a list/tuple or any finite iterable of
        strings (materialised once, so seeded draws are reproducible); or a ``datasets.Dataset``
        (anything with ``column_names``), whose ``column`` is used.
    :param column: column holding the prompt text when ``prompts`` is a dataset.
    :return: the prompts as a list of ``str``.
    :raises ValueError: the source is empty, a single plain string, a dataset without ``column``,
        or holds an empty or non-string prompt.
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
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"prompt #{i} is {item!r}: every prompt must be a non-empty string")
    return items

