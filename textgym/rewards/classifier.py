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
    :param device: where the classifier runs (``"cpu"``, ``"cuda"``, a ``torch.device``); scores
        come back as CPU numpy arrays either way.
    """

    def __init__(self, name_or_path: str, label_index: int = -1, max_length: int = 512,
                 device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.device = torch.device(device)
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).eval().to(self.device)
        self.label_index = label_index
        self.max_length = max_length

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Score each ``prompt + completion``; returns ``float32`` logits of shape ``(n,)``."""
        texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits
        return logits[:, self.label_index].float().cpu().numpy()
