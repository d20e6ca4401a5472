"""Module paths that moved: importing an old path fails with a message naming the new one.

``import textgym`` installs a :class:`MovedModuleFinder` for :data:`MOVED` on ``sys.meta_path``;
``import agents`` installs one for its own table.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Mapping

MOVED = {
    "textgym.reward_model": "textgym.rewards.finetuned",
    "textgym.synthetic": "textgym.tasks.synthetic",
    "textgym.train_reward_model": "textgym.rewards.train_reward_model",
    "textgym.train_sentiment_head": "textgym.rewards.train_sentiment_head",
}
"""Old module path -> the module that now holds its contents."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Meta path finder that raises ``ModuleNotFoundError`` naming the new module for a path in
    its table, and finds nothing otherwise (other finders handle every other import).

    :param moved: old module path -> where its contents are now (the text after "moved to").
    """

    def __init__(self, moved: Mapping[str, str]):
        self.moved = dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.moved:
            raise ModuleNotFoundError(f"{fullname} moved to {self.moved[fullname]}", name=fullname)
        return None  # not a moved module: the other finders look for it


def install(moved: Mapping[str, str] = MOVED) -> None:
    """Append a :class:`MovedModuleFinder` for ``moved`` to ``sys.meta_path`` (once per process and table).

    It goes first: an old path then fails with its message even where another finder would still
    find the old file (a stale copy, or an editable install of another checkout that has it).

    :param moved: old module path -> where its contents are now; default: textgym's :data:`MOVED`.
    """
    if not any(isinstance(finder, MovedModuleFinder) and finder.moved == dict(moved) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder(moved))
