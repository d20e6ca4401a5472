"""The frozen-encoder sentiment reward model and its packaged logistic head."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import torch

from textgym import assets
from textgym.rewards.embeddings import mean_pooled_embeddings

SENTIMENT_HEAD_FILE = "sentiment_head.json"
"""Package data file (``textgym/data``) holding the default sentiment head and its provenance."""


class SentimentRewardModel:
    """The previous default reward model: positive-sentiment logit of ``prompt + completion`` from a
    frozen encoder and a logistic head (the default is now :class:`~textgym.rewards.finetuned.FineTunedRewardModel`).

    all-MiniLM-L6-v2 sentence embeddings (frozen) followed by a logistic-regression head fitted to
    the sign of human ratings of 8.4k movie-review sentences (Hutto & Gilbert 2014), trained by
    ``python -m textgym.rewards.train_sentiment_head``. The score is the head's logit
    ``w . e + b`` (unbounded float; > 0 means "more likely positive"), as Ziegler et al. (2019)
    used a sentiment classifier's logit as reward.

    :param head: ``{"weight": list[float] (384,), "bias": float}``; default: the packaged head.
    :param device: where the encoder runs; scores come back as CPU numpy arrays either way.
    :raises textgym.assets.AssetError: the encoder could not be fetched.
    """

    def __init__(self, head: dict | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        head = head or load_sentiment_head()
        path = assets.minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).eval().to(device)
        self.weight = torch.tensor(head["weight"], dtype=torch.float32, device=device)
        self.bias = float(head["bias"])

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Score each ``prompt + completion``; returns ``float32`` logits of shape ``(n,)``."""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        embeddings = mean_pooled_embeddings(self.encoder, self.tokenizer, texts)
        return (embeddings @ self.weight + self.bias).cpu().numpy()


def load_sentiment_head() -> dict:
    """The packaged sentiment head: weight, bias, and how it was trained (split, accuracy)."""
    text = resources.files("textgym").joinpath("data", SENTIMENT_HEAD_FILE).read_text()
    return json.loads(text)
