"""Sentence embeddings as in sentence-transformers: attention-masked mean pooling, L2-normalised.

Shared by the frozen-encoder :class:`textgym.rewards.sentiment.SentimentRewardModel` and the
fine-tuned :class:`textgym.rewards.finetuned.FineTunedRewardModel`.
"""

from __future__ import annotations

from typing import Any

import torch


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
    :return: ``float32`` tensor ``(len(texts), hidden_size)`` on the encoder's device, rows of unit L2 norm.
    """
    device = next(encoder.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=256, return_tensors="pt").to(device)
            chunks.append(mean_pool(encoder(**batch).last_hidden_state, batch["attention_mask"]))
    return torch.cat(chunks)
