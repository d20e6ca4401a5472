"""Reward models: callables that score finished generations.

A reward model is any callable ``(prompts: list[str], completions: list[str]) -> sequence of float``
returning one finite score per pair (the convention of TRL's reward functions). It may instead
return a mapping of named components, each a sequence of one float per pair, whose ``"score"``
entry is the reward (e.g. ``{"score": ..., "correct": ..., "format": ...}`` for a verifiable
reward, :mod:`textgym.rewards.verifiable`); the env reports every component in
``info["reward_components"]``. textgym calls it once per finished episode; :func:`as_reward_fn`
turns the accepted kinds of input into such a callable and :func:`reward_components` enforces the
contract.

This module holds only that contract and the loaders of the shared default models, and imports
neither torch nor transformers; the models live in submodules, imported when first used:

- :mod:`textgym.rewards.finetuned`: :class:`FineTunedRewardModel` (the default, MiniLM + LoRA + head);
- :mod:`textgym.rewards.sentiment`: :class:`SentimentRewardModel` (frozen MiniLM + logistic head);
- :mod:`textgym.rewards.classifier`: :class:`SequenceClassifierReward` (any sequence classifier);
- :mod:`textgym.rewards.verifiable`: :func:`extract_answer`, the answer rule of verifiable rewards;
- :mod:`textgym.rewards.embeddings`: :func:`mean_pool`, :func:`mean_pooled_embeddings`;
- :mod:`textgym.rewards.train_reward_model`, :mod:`textgym.rewards.train_sentiment_head`: the
  trainers of the shipped models (``python -m textgym.rewards.train_reward_model``, ...).

Their names stay reachable here too (``textgym.rewards.SentimentRewardModel``, ...).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from textgym._lazy import lazy_names

if TYPE_CHECKING:
    from textgym.rewards.classifier import SequenceClassifierReward
    from textgym.rewards.sentiment import SentimentRewardModel

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

_SUBMODULE_NAMES = {
    "mean_pool": "textgym.rewards.embeddings",
    "mean_pooled_embeddings": "textgym.rewards.embeddings",
    "SentimentRewardModel": "textgym.rewards.sentiment",
    "load_sentiment_head": "textgym.rewards.sentiment",
    "SENTIMENT_HEAD_FILE": "textgym.rewards.sentiment",
    "SequenceClassifierReward": "textgym.rewards.classifier",
    "FineTunedRewardModel": "textgym.rewards.finetuned",
}
"""Names defined in a submodule, reachable as ``textgym.rewards.<name>`` (imported on first use)."""


__getattr__ = lazy_names(__name__, _SUBMODULE_NAMES)  # PEP 562: a submodule's name on first access


def check_rewards(scores: Any, n: int) -> np.ndarray:
    """Validate a reward model's output.

    :param scores: what the reward model returned for ``n`` (prompt, completion) pairs.
    :param n: number of pairs scored.
    :return: ``np.float64`` array of shape ``(n,)``.
    :raises ValueError: not a flat sequence of ``n`` numbers, or a score is NaN or infinite.
    """
    if scores is None:
        raise ValueError(f"reward model returned None for {n} completions; it must return one float per "
                         f"completion, shape ({n},) (does it end without a return statement?)")
    listed = isinstance(scores, (list, tuple)) or (isinstance(scores, np.ndarray) and scores.dtype == object
                                                   and scores.ndim == 1)
    if listed and any(score is None for score in scores):
        missing = [i for i, score in enumerate(scores) if score is None]
        raise ValueError(f"reward model returned None for completion(s) {missing} of {n}; every completion needs "
                         "a finite float score (return 0.0, or a penalty, where there is nothing to score)")
    torch = sys.modules.get("torch")  # a torch tensor implies torch is imported; never import it here
    if torch is not None and isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    try:
        values = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward model must return a sequence of {n} floats, got {scores!r}") from err
    if values.shape != (n,):
        raise ValueError(
            f"reward model returned shape {values.shape} for {n} completions; "
            f"it must return one float per completion, shape ({n},)"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"reward model returned a non-finite score: {values.tolist()}")
    return values


def reward_components(output: Any, n: int) -> dict[str, np.ndarray]:
    """Validate a reward model's output, plain scores or named components (see the module doc).

    :param output: what the reward model returned for ``n`` pairs: a sequence of ``n`` floats, or
        a mapping ``name -> sequence of n floats`` with a ``"score"`` entry.
    :param n: number of pairs scored.
    :return: ``{"score": float64 (n,), ...}``: the reward under ``"score"``, then any other components.
    :raises ValueError: a mapping without ``"score"``, or any entry fails :func:`check_rewards`.
    """
    if not isinstance(output, Mapping):
        return {"score": check_rewards(output, n)}
    if "score" not in output:
        raise ValueError(f"a reward model that returns components must include 'score' (the reward); "
                         f"got components {sorted(output)}")
    return {"score": check_rewards(output["score"], n),
            **{str(name): check_rewards(value, n) for name, value in output.items() if name != "score"}}


@functools.lru_cache(maxsize=1)
def sentiment_head_reward_model() -> SentimentRewardModel:
    """The frozen-encoder :class:`SentimentRewardModel` (the default until the fine-tuned model),
    loaded once per process and shared by all envs."""
    from textgym.rewards.sentiment import SentimentRewardModel

    return SentimentRewardModel()


@functools.lru_cache(maxsize=1)
def finetuned_reward_model() -> Any:
    """The shipped :class:`textgym.rewards.finetuned.FineTunedRewardModel` (all-MiniLM-L6-v2 +
    LoRA + head, fitted by ``python -m textgym.rewards.train_reward_model``), loaded once per process.

    :raises textgym.assets.AssetError: the encoder could not be fetched.
    """
    from textgym.rewards.finetuned import FineTunedRewardModel

    return FineTunedRewardModel.pretrained()


def default_reward_model() -> Any:
    """The default reward model of ``TextGen-v0``, loaded once per process and shared by all envs:
    the fine-tuned :func:`finetuned_reward_model` (held-out sign accuracy above the frozen head's,
    see ``textgym/data/reward_model/reward_head.json``)."""
    return finetuned_reward_model()


@functools.lru_cache(maxsize=4)
def _classifier(name_or_path: str) -> SequenceClassifierReward:
    from textgym.rewards.classifier import SequenceClassifierReward

    return SequenceClassifierReward(name_or_path)


def as_reward_fn(reward_model: Any = None) -> RewardFn:
    """Turn the accepted kinds of reward model into a callable.

    :param reward_model: ``None`` or ``"sentiment"`` (the default, :func:`default_reward_model`);
        another string: hub id or path of an ``AutoModelForSequenceClassification``
        (:class:`SequenceClassifierReward`); or a callable ``(prompts, completions) -> floats``.
    :return: the reward callable (string-loaded models are shared within a process).
    :raises TypeError: anything else.
    """
    if reward_model is None or reward_model == "sentiment":
        return default_reward_model()
    if isinstance(reward_model, str):
        return _classifier(reward_model)
    if callable(reward_model):
        return reward_model
    raise TypeError(
        f"reward_model must be None, 'sentiment', a classifier id/path or a callable "
        f"(prompts, completions) -> floats; got {type(reward_model).__name__}"
    )
