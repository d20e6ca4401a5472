"""textgym: text generation as a Gymnasium environment, trained with upstream Stable-Baselines3.

``import textgym`` registers ``TextGen-v0`` (:class:`textgym.env.TextGenEnv`),
``TextGen-Reasoning-v0`` (reasoning-gym tasks, :mod:`textgym.tasks.reasoning`), the multi-turn
``TextGen-Dialogue-v0`` (any :class:`textgym.dialogue.DialogueGame`) and ``TextArena-v0``
(TextArena's single-player games, :mod:`textgym.tasks.textarena`), and the synthetic
sanity tasks of :mod:`textgym.tasks.synthetic` (``TextGen-Keyword-v0``, ...) with Gymnasium. It
stays light (neither torch nor transformers is imported): the public names below are imported
from their modules on first access, e.g. ``textgym.TextGenEnv``.

Layout: :mod:`textgym.env` (the environment), :mod:`textgym.spaces`, :mod:`textgym.prompts`,
:mod:`textgym.assets`, :mod:`textgym.tiny`, :mod:`textgym.chat` (chat templates), :mod:`textgym.dialogue`
(multi-turn games), :mod:`textgym.vec_env` (VecEnv wrappers: envs that share prompts for RLOO/GRPO, batched reward scoring); :mod:`textgym.tasks`
(what to generate: the sentiment task's prompts, the reasoning-gym tasks, the synthetic tasks) and :mod:`textgym.rewards` (the reward contract and models).
"""

from __future__ import annotations

import importlib
from typing import Any

from gymnasium.envs.registration import register

from textgym import _moved
from textgym.tasks.synthetic import register_synthetic_tasks

_moved.install()  # importing an old module path (textgym.synthetic, ...) names its new place

register(id="TextGen-v0", entry_point="textgym.env:TextGenEnv")
register(id="TextGen-Reasoning-v0", entry_point="textgym.tasks.reasoning:make_reasoning_env")
register(id="TextGen-Dialogue-v0", entry_point="textgym.dialogue:DialogueEnv")
register(id="TextArena-v0", entry_point="textgym.tasks.textarena:make_textarena_env")
register_synthetic_tasks()  # TextGen-Keyword-v0, -Copy-v0, -Reverse-v0, -Increasing-v0

_PUBLIC = {
    "DEFAULT_MODEL": "textgym.assets",
    "AssetError": "textgym.assets",
    "DialogueEnv": "textgym.dialogue",
    "DialogueGame": "textgym.dialogue",
    "FineTunedRewardModel": "textgym.rewards.finetuned",
    "GroupedPrompts": "textgym.vec_env",
    "TASKS": "textgym.tasks.synthetic",
    "SentimentRewardModel": "textgym.rewards.sentiment",
    "SequenceClassifierReward": "textgym.rewards.classifier",
    "TextGenEnv": "textgym.env",
    "TokenWindowSpace": "textgym.spaces",
    "allow_other_tokenizer": "textgym.spaces",
    "movie_review_prompts": "textgym.tasks.sentiment",
}
"""Public name -> the module defining it (imported on first access of ``textgym.<name>``)."""

_SUBMODULES = ("assets", "chat", "dialogue", "env", "prompts", "rewards", "spaces", "tasks", "tiny", "vec_env")
"""Submodules reachable as ``textgym.<module>`` after a bare ``import textgym`` (imported on first access)."""

__all__ = [
    "DEFAULT_MODEL",
    "AssetError",
    "DialogueEnv",
    "DialogueGame",
    "FineTunedRewardModel",
    "GroupedPrompts",
    "TASKS",
    "SentimentRewardModel",
    "SequenceClassifierReward",
    "TextGenEnv",
    "TokenWindowSpace",
    "allow_other_tokenizer",
    "movie_review_prompts",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """PEP 562: import a public name (see :data:`_PUBLIC`) from its module, or a submodule, on first access."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
