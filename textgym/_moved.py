"""Module paths that moved: importing an old path fails with a message naming the new one.

:class:`MovedModuleFinder` is installed on ``sys.meta_path`` by ``import textgym``.
"""

from __future__ import annotations

import importlib.abc
import sys

MOVED = {
    "textgym.reward_model": "textgym.rewards.finetuned",
    "textgym.synthetic": "textgym.tasks.synthetic",
    "textgym.train_reward_model": "textgym.rewards.train_reward_model",
    "textgym.train_sentiment_head": "textgym.rewards.train_sentiment_head",
}
"""Old module path -> the module that now holds its contents."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Meta path finder that raises ``ModuleNotFoundError`` naming the new module for a path in
    :data:`MOVED`, and finds nothing otherwise (other finders handle every other import)."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MOVED:
            raise ModuleNotFoundError(f"{fullname} moved to {MOVED[fullname]}", name=fullname)
        return None  # not a moved module: the other finders look for it


def install() -> None:
    """Append :class:`MovedModuleFinder` to ``sys.meta_path`` (once per process)."""
    if MovedModuleFinder not in sys.meta_path:
        sys.meta_path.append(MovedModuleFinder)
