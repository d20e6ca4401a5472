"""Verifiable rewards: pull the final answer out of a reply, so that a program can check it.

RL with verifiable rewards (Shao et al. 2024, DeepSeekMath's GRPO; Lambert et al. 2024, Tülu 3)
scores a reply by checking its final answer, not by a learned reward model. The model is asked
to put that answer inside ``<answer>...</answer>`` (as DeepSeek-R1 and reasoning-gym's own
prompts do); :func:`extract_answer` reads it back by a fixed, documented rule that copes with
replies which ignore the format.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
OPEN_TAG, CLOSE_TAG = "<answer>", "</answer>"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
"""A number as people write it: optional sign, digits with optional thousands commas, optional decimals."""

FALLBACKS = ("last_number", "reply", None)


@dataclass(frozen=True)
class ExtractedAnswer:
    """What :func:`extract_answer` found in a reply.

    :param answer: the answer text (stripped), or ``None`` when the reply holds none.
    :param well_formatted: True iff the reply holds exactly one ``<answer>...</answer>`` pair and
        no other answer tag: the format the prompt asked for.
    :param source: ``"tag"`` (inside a closed tag pair), ``"open_tag"`` (after an unclosed
        ``<answer>``), ``"fallback"`` (see :func:`extract_answer`) or ``"none"``.
    """

    answer: str | None
    well_formatted: bool
    source: str


def extract_answer(reply: str, fallback: str | None = "last_number") -> ExtractedAnswer:
    """Extract the final answer of a reply.

    The rule, in order:

    1. If the reply holds one or more closed pairs ``<answer>...</answer>``, the answer is the
       content of the **last** pair, stripped. The reply is well formatted only if it holds exactly
       one pair and no stray ``<answer>`` / ``</answer>``.
    2. Else, if it holds an opening ``<answer>`` that is never closed (e.g. the reply hit the token
       limit), the answer is the text after the last ``<answer>``, stripped (not well formatted).
    3. Else the fallback applies (not well formatted): ``"last_number"`` (default): the last number
       in the reply (sign, thousands commas and decimals kept, e.g. ``"-1,200.5"``), or ``None`` if
       it has no number; ``"reply"``: the whole reply, stripped; ``None``: no answer.

    An empty answer counts as no answer (``None``).

    :param reply: the model's reply (decoded text, special tokens removed).
    :param fallback: ``"last_number"``, ``"reply"`` or ``None``.
    :return: an :class:`ExtractedAnswer`.
    :raises ValueError: unknown ``fallback``.
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    pairs = ANSWER_TAG.findall(reply)
    if pairs:
        stray = ANSWER_TAG.sub("", reply)
        well = len(pairs) == 1 and OPEN_TAG not in stray and CLOSE_TAG not in stray
        return ExtractedAnswer(pairs[-1].strip() or None, well, "tag")
    if OPEN_TAG in reply:
        return ExtractedAnswer(reply.rsplit(OPEN_TAG, 1)[1].strip() or None, False, "open_tag")
    if fallback == "last_number":
        numbers = NUMBER.findall(reply)
        answer = numbers[-1].rstrip(",") if numbers else None
    elif fallback == "reply":
        answer = reply.strip() or None
    else:
        answer = None
    return ExtractedAnswer(answer, False, "fallback" if answer is not None else "none")


class VerifiableReward:
    """Reward model ``(prompts, completions) -> {"score", "correct", "format"}`` that checks answers.

    For each reply: ``correct = score_answer(extract_answer(reply, fallback).answer, entries[prompt])``
    (0 when no answer was found), ``format`` = 1.0 if the reply is well formatted (exactly one
    ``<answer>...</answer>``) else 0.0, and the reward is ``score = correct + format_weight * format``.
    Returned as named components (see :mod:`textgym.rewards`), so the env reports correctness and
    format separately in ``info["reward_components"]``.

    :param entries: prompt text -> whatever ``score_answer`` needs to check an answer to it (for
        reasoning-gym: the dataset entry; or simply the expected answer).
    :param score_answer: ``(answer: str, entry) -> float`` in ``[0, 1]``, e.g. a reasoning-gym
        dataset's ``score_answer``.
    :param format_weight: reward per well-formatted reply, added to correctness.
    :param fallback: answer rule for replies without tags (:func:`extract_answer`).
    :raises ValueError: unknown ``fallback``; (when called) a prompt missing from ``entries``.
    """

    def __init__(self, entries: Mapping[str, Any], score_answer: Callable[[str, Any], float],
                 format_weight: float = 0.0, fallback: str | None = "last_number"):
        extract_answer("", fallback)  # an unknown fallback fails here, not at the first reward
        self.entries, self.score_answer = entries, score_answer
        self.format_weight, self.fallback = float(format_weight), fallback

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> dict[str, np.ndarray]:
        """Check each reply; returns ``{"score", "correct", "format"}``, each ``float64 (n,)``."""
        correct, well = [], []
        for prompt, completion in zip(prompts, completions, strict=True):
            if prompt not in self.entries:
                raise ValueError(f"prompt {prompt[:80]!r} has no entry to check answers against")
            found = extract_answer(completion, self.fallback)
            correct.append(0.0 if found.answer is None else float(self.score_answer(found.answer, self.entries[prompt])))
            well.append(float(found.well_formatted))
        correct_arr, format_arr = np.asarray(correct, dtype=np.float64), np.asarray(well, dtype=np.float64)
        return {"score": correct_arr + self.format_weight * format_arr, "correct": correct_arr, "format": format_arr}
