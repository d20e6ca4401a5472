"""The observation space of text generation: prompt + generated prefix as integer token ids."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

_COMPARE_TOKENIZERS = contextvars.ContextVar("textgym_compare_tokenizers", default=True)
"""Off inside :func:`allow_other_tokenizer`."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of what makes token ids mean the same words: the vocabulary's size, its
    token -> id map and the special tokens' ids.

    Two tokenizers of the same vocabulary size but another word order get different
    fingerprints; the same tokenizer under another path or hub id gets the same one.

    :param tokenizer: a Hugging Face tokenizer (``len``, ``get_vocab``, ``all_special_ids``).
    :return: 16 hex digits of a SHA-256.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")}
    content = {"size": len(tokenizer), "vocab": vocab, "special": sorted(tokenizer.all_special_ids), **specials}
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


@contextlib.contextmanager
def allow_other_tokenizer() -> Iterator[None]:
    """Within this block, :class:`TokenWindowSpace`\\ s compare equal whatever their tokenizer
    fingerprints, so ``PPO.load(path, env=env)``, ``set_env`` and :func:`agents.load_training_state`
    accept an env whose tokenizer differs from the saved run's.

    Only for a tokenizer known to give every token the id the saved one did (e.g. the same
    vocabulary with other added tokens' names); otherwise the policy reads other words than it
    was trained on, silently.
    """
    token = _COMPARE_TOKENIZERS.set(False)
    try:
        yield
    finally:
        _COMPARE_TOKENIZERS.reset(token)


def same_tokenizer(a: str | None, b: str | None) -> bool:
    """Whether two fingerprints may be of the same tokenizer: equal, either unknown (``None``,
    spaces saved before fingerprints), or compared inside :func:`allow_other_tokenizer`."""
    return a is None or b is None or a == b or not _COMPARE_TOKENIZERS.get()


class TokenWindowSpace(spaces.Dict):
    """Fixed-shape ``Dict`` observation holding a prompt and the tokens generated after it.

    Layout of both arrays, length ``L = prompt_length + max_new_tokens``::

        [ pad ... pad | prompt tokens ][ generated tokens | pad ... pad ]
          <----- prompt_length ------><-------- max_new_tokens -------->

    The prompt is left-padded into the first ``prompt_length`` slots and generated tokens follow it,
    so the real tokens always form one contiguous block and the next token goes into the slot
    right after the last real one.

    - ``"input_ids"``: ``np.int64``, shape ``(L,)``, values in ``[0, vocab_size)``; padding is 0.
    - ``"attention_mask"``: ``np.int8``, shape ``(L,)``, 1 on real tokens, 0 on padding.

    Token ids stay integral: policies should read them as integer tensors, never through a float
    cast (SB3's ``preprocess_obs`` casts ``Box`` observations to float).

    :param vocab_size: number of token ids (the action space's ``n``).
    :param prompt_length: slots reserved for the prompt (the longest allowed prompt, in tokens).
    :param max_new_tokens: slots for generated tokens (episode length limit).
    :param model_name_or_path: the model whose tokenizer produced the ids; policies default to it
        so that the env and the policy cannot disagree on the vocabulary.
    :param seed: seed of the space's own sampler.
    :param tokenizer_fingerprint: :func:`tokenizer_fingerprint` of that tokenizer (the envs set it).
        Two spaces with different fingerprints are unequal, so SB3's ``PPO.load(path, env=env)`` and
        ``set_env`` refuse an env whose tokenizer maps ids to other tokens than the saved run's,
        even at the same vocabulary size (override: :func:`allow_other_tokenizer`). ``None``
        (unknown, as in spaces pickled before fingerprints) compares equal to any.
    :raises ValueError: a size is not a positive integer.
    """

    def __init__(
        self,
        vocab_size: int,
        prompt_length: int,
        max_new_tokens: int,
        model_name_or_path: str | None = None,
        seed: int | None = None,
        tokenizer_fingerprint: str | None = None,
    ):
        for name, value in (("vocab_size", vocab_size), ("prompt_length", prompt_length),
                            ("max_new_tokens", max_new_tokens)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.vocab_size = int(vocab_size)
        self.prompt_length = int(prompt_length)
        self.max_new_tokens = int(max_new_tokens)
        self.model_name_or_path = model_name_or_path
        self.tokenizer_fingerprint = tokenizer_fingerprint
        length = self.prompt_length + self.max_new_tokens
        super().__init__(
            {
                "input_ids": spaces.Box(0, self.vocab_size - 1, (length,), np.int64),
                "attention_mask": spaces.Box(0, 1, (length,), np.int8),
            },
            seed=seed,
        )

    def encode(self, prompt_ids: Sequence[int], generated_ids: Sequence[int]) -> dict[str, np.ndarray]:
        """Lay out one observation.

        :param prompt_ids: prompt token ids, at most ``prompt_length`` of them.
        :param generated_ids: generated token ids, at most ``max_new_tokens`` of them.
        :return: ``{"input_ids": int64 (L,), "attention_mask": int8 (L,)}``.
        :raises ValueError: either sequence is longer than its window.
        """
        p, g = len(prompt_ids), len(generated_ids)
        if p > self.prompt_length or g > self.max_new_tokens:
            raise ValueError(
                f"{p} prompt / {g} generated tokens do not fit windows of "
                f"{self.prompt_length} / {self.max_new_tokens}"
            )
        ids = np.zeros(self.prompt_length + self.max_new_tokens, dtype=np.int64)
        mask = np.zeros_like(ids, dtype=np.int8)
        start, end = self.prompt_length - p, self.prompt_length + g
        ids[start:end] = [*prompt_ids, *generated_ids]
        mask[start:end] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __eq__(self, other: Any) -> bool:
        """Equal shapes and bounds (gymnasium's ``Dict``) and, where both are known, the same tokenizer."""
        return super().__eq__(other) and same_tokenizer(getattr(self, "tokenizer_fingerprint", None),
                                                        getattr(other, "tokenizer_fingerprint", None))

    __hash__ = None  # mutable and compared by value, as gymnasium's Dict

    def __repr__(self) -> str:
        fingerprint = getattr(self, "tokenizer_fingerprint", None)  # absent from spaces pickled by older textgym
        return (f"TokenWindowSpace(vocab_size={self.vocab_size}, prompt_length={self.prompt_length}, "
                f"max_new_tokens={self.max_new_tokens}, model_name_or_path={self.model_name_or_path!r}"
                + (f", tokenizer_fingerprint={fingerprint!r})" if fingerprint else ")"))
