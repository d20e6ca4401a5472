"""Reward models: callables that score finished generations.

A reward model is any callable ``(prompts: list[str], completions: list[str]) -> sequence of float``
returning one finite score per pair (the convention of TRL's reward functions). textgym calls it
once per finished episode; :func:`as_reward_fn` turns the accepted kinds of input into such a
callable and :func:`check_rewards` enforces the contract.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch

from textgym import assets

RewardFn = Callable[[list[str], list[str]], Sequence[float]]

SENTIMENT_HEAD_FILE = "sentiment_head.json"
"""Package data file (``textgym/data``) holding the default sentiment head and its provenance."""


def check_rewards(scores: Any, n: int) -> np.ndarray:
    """Validate a reward model's output.

    :param scores: what the reward model returned for ``n`` (prompt, completion) pairs.
    :param n: number of pairs scored.
    :return: ``np.float64`` array of shape ``(n,)``.
    :raises ValueError: not a flat sequence of ``n`` numbers, or a score is NaN or infinite.
    """
    if isinstance(scores, torch.Tensor):
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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers pooling: masked mean over tokens, then L2 normalisation.

    :param hidden: ``float`` tensor ``(batch, seq, hidden)``, the encoder's last hidden states.
    :param attention_mask: ``(batch, seq)`` tensor of 0/1 (padding = 0).
    :return: ``float`` tensor ``(batch, hidden)`` with rows of unit L2 norm (differentiable).
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def mean_pooled_embeddings(encoder: torch.nn.Module, tokenizer: Any, texts: list[str],
                           batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings as in sentence-transformers: masked mean of last hidden states, L2-normalised.

    :param encoder: a transformers encoder (e.g. all-MiniLM-L6-v2's ``BertModel``), in eval mode.
    :param tokenizer: its tokenizer.
    :param texts: sentences to embed.
    :param batch_size: sentences per forward pass.
    :return: ``float32`` tensor ``(len(texts), hidden_size)``, rows of unit L2 norm.
    """
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=256, return_tensors="pt")
            chunks.append(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(chunks)


class SentimentRewardModel:
    """Default reward model: positive-sentiment logit of ``prompt + completion``.

    all-MiniLM-L6-v2 sentence embeddings (frozen) followed by a logistic-regression head fitted to
    the sign of human ratings of 8.4k movie-review sentences (Hutto & Gilbert 2014), trained by
    ``python -m textgym.train_sentiment_head``. The score is the head's logit
    ``w . e + b`` (unbounded float; > 0 means "more likely positive"), as Ziegler et al. (2019)
    used a sentiment classifier's logit as reward.

    :param head: ``{"weight": list[float] (384,), "bias": float}``; default: the packaged head.
    :raises textgym.assets.AssetError: the encoder could not be fetched.
    """

    def __init__(self, head: dict | None = None):
        from transformers import AutoModel, AutoTokenizer

        head = head or load_sentiment_head()
        path = assets.minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval()
        self.weight = torch.tensor(head["weight"], dtype=torch.float32)
        self.bias = float(head["bias"])

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Score each ``prompt + completion``; returns ``float32`` logits of shape ``(n,)``."""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        embeddings = mean_pooled_embeddings(self.encoder, self.tokenizer, texts)
        return (embeddings @ self.weight + self.bias).numpy()


def load_sentiment_head() -> dict:
    """The packaged sentiment head: weight, bias, and how it was trained (split, accuracy)."""
    text = resources.files("textgym").joinpath("data", SENTIMENT_HEAD_FILE).read_text()
    return json.loads(text)


class SequenceClassifierReward:
    """Reward from any ``AutoModelForSequenceClassification`` (hub id or local path).

    The score of ``prompt + completion`` is the logit of class ``label_index`` (for a single-output
    reward model, its only output).

    :param name_or_path: hub id or directory of the classifier and its tokenizer.
    :param label_index: which output logit is the reward; default: the last (e.g. "positive").
    :param max_length: truncate texts to this many tokens.
    """

    def __init__(self, name_or_path: str, label_index: int = -1, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval()
        self.label_index = label_index
        self.max_length = max_length

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Score each ``prompt + completion``; returns ``float32`` logits of shape ``(n,)``."""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        with torch.no_grad():
            logits = self.model(**batch).logits
        return logits[:, self.label_index].float().numpy()


@functools.lru_cache(maxsize=1)
def sentiment_head_reward_model() -> SentimentRewardModel:
    """The frozen-encoder :class:`SentimentRewardModel` (the default until the fine-tuned model),
    loaded once per process and shared by all envs."""
    return SentimentRewardModel()


@functools.lru_cache(maxsize=1)
def finetuned_reward_model() -> Any:
    """The shipped :class:`textgym.reward_model.FineTunedRewardModel` (all-MiniLM-L6-v2 + LoRA +
    head, fitted by ``python -m textgym.train_reward_model``), loaded once per process.

    :raises textgym.assets.AssetError: the encoder could not be fetched.
    """
    from textgym.reward_model import FineTunedRewardModel

    return FineTunedRewardModel.pretrained()


def default_reward_model() -> Any:
    """The default reward model of ``TextGen-v0``, loaded once per process and shared by all envs:
    the fine-tuned :func:`finetuned_reward_model` (held-out sign accuracy above the frozen head's,
    see ``textgym/data/reward_model/reward_head.json``)."""
    return finetuned_reward_model()


@functools.lru_cache(maxsize=4)
def _classifier(name_or_path: str) -> SequenceClassifierReward:
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
