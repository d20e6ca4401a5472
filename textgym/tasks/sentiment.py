"""The sentiment task's prompts: openings of human-written movie-review sentences."""

from __future__ import annotations

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
