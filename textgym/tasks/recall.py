"""A scripted two-turn game whose right second reply depends on the game's first answer.

The smallest task that a single-turn environment cannot express: the game opens with a fixed
message, the agent replies (anything), the game answers with a word drawn at random from
``words``, and the agent scores 1 if its second reply starts with that word, else 0. A policy that
ignores the game's answer scores at most ``1 / len(words)`` (0.5 for the default two words); only
one that reads the answer can do better. It is the sanity check of :class:`textgym.dialogue.DialogueEnv`
that :mod:`textgym.tasks.synthetic` is for single-turn generation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from textgym.dialogue import DialogueGame


class RecallGame(DialogueGame):
    """Two turns: reply to ``opening``; then repeat the word the game answers with.

    :param words: the words the game draws from (uniformly, with the seed of :meth:`reset`); each
        must be one token of the model's vocabulary for the task to be as easy as it looks.
    :param opening: the first message.
    :raises ValueError: fewer than two words.
    """

    def __init__(self, words: Sequence[str] = ("good", "bad"), opening: str = "the movie"):
        if len(words) < 2:
            raise ValueError(f"RecallGame needs at least two words to draw from, got {list(words)!r}")
        self.words, self.opening = tuple(words), opening
        self.secret: str | None = None
        self._rng = np.random.default_rng()

    @property
    def blind_optimum(self) -> float:
        """Best expected reward of a policy that ignores the game's answer: ``1 / len(words)``."""
        return 1.0 / len(self.words)

    def reset(self, seed: int | None = None) -> str:
        """New game; the answer word is drawn later, in the first :meth:`respond`."""
        self._rng = np.random.default_rng(seed)
        self.secret = None
        return self.opening

    def respond(self, reply: str) -> tuple[str | None, float, bool]:
        """First reply: answer with a random word (reward 0). Second: 1.0 if it starts with that word."""
        if self.secret is None:
            self.secret = str(self._rng.choice(self.words))
            return self.secret, 0.0, False
        return None, float(reply.split()[:1] == [self.secret]), True

    def info(self) -> dict[str, Any]:
        """``{"secret": the word the second reply had to start with}``."""
        return {"secret": self.secret}
