"""Module paths that moved: importing an old path still works, with a warning naming the new one.

``import textgym`` installs a :class:`MovedModuleFinder` for :data:`MOVED` on ``sys.meta_path``;
``import agents`` installs one for its own table. An old path is an alias of the module that now
holds its contents, not an error: checkpoints pickle classes by module path (an SB3 zip written
before ``agents/`` was arranged by role names ``agents.buffers.EpisodeRolloutBuffer``), and those
checkpoints must keep loading. Code that imports an old path gets a ``FutureWarning`` naming the
new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Mapping

MOVED = {
    "textgym.reward_model": "textgym.rewards.finetuned",
    "textgym.synthetic": "textgym.tasks.synthetic",
    "textgym.train_reward_model": "textgym.rewards.train_reward_model",
    "textgym.train_sentiment_head": "textgym.rewards.train_sentiment_head",
}
"""Old module path -> the module that now holds its contents."""


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Meta path finder and loader that imports, for an old path in its table, the module that now
    holds its contents (the same module object, under both names) and warns with a
    ``FutureWarning`` naming it; it finds nothing otherwise (other finders handle every other import).

    :param moved: old module path -> new module path, optionally followed by a note in parentheses
        (``"agents.policy.lora (save_adapters, load_adapters: agents.training.checkpoints)"``),
        which the warning repeats.
    """

    def __init__(self, moved: Mapping[str, str]):
        self.moved = dict(moved)

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.moved:
            return importlib.util.spec_from_loader(fullname, self)
        return None  # not a moved module: the other finders look for it

    def create_module(self, spec):
        new_place = self.moved[spec.name]
        warnings.warn(f"{spec.name} moved to {new_place}: import it from there (the old path still imports "
                      "so that checkpoints saved before the move load)", FutureWarning, stacklevel=2)
        module = importlib.import_module(new_place.split(" (")[0])
        self._new_spec = module.__spec__  # the import system overwrites __spec__ with the alias's: put it back
        return module

    def exec_module(self, module):
        module.__spec__ = self._new_spec


def install(moved: Mapping[str, str] = MOVED) -> None:
    """Put a :class:`MovedModuleFinder` for ``moved`` first on ``sys.meta_path`` (once per process and table).

    It goes first: an old path then imports the new module even where another finder would still
    find the old file (a stale copy, or an editable install of another checkout that has it).

    :param moved: old module path -> where its contents are now; default: textgym's :data:`MOVED`.
    """
    if not any(isinstance(finder, MovedModuleFinder) and finder.moved == dict(moved) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder(moved))
