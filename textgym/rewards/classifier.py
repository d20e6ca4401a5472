"""Reward from any ``transformers`` sequence classifier (hub id or local path)."""

from __future__ import annotations

import numpy as np
import torch


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
