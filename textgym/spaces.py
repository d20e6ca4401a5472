"""The observation space of text generation: prompt + generated prefix as integer token ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gymnasium import spaces


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
    :raises ValueError: a size is not a positive integer.
    """

    def __init__(
        self,
        vocab_size: int,
        prompt_length: int,
        max_new_tokens: int,
        model_name_or_path: str | None = None,
        seed: int | None = None,
    ):
        for name, value in (("vocab_size", vocab_size), ("prompt_length", prompt_length),
                            ("max_new_tokens", max_new_tokens)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.vocab_size = int(vocab_size)
        self.prompt_length = int(prompt_length)
        self.max_new_tokens = int(max_new_tokens)
        self.model_name_or_path = model_name_or_path
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

    def __repr__(self) -> str:
        return (f"TokenWindowSpace(vocab_size={self.vocab_size}, prompt_length={self.prompt_length}, "
                f"max_new_tokens={self.max_new_tokens}, model_name_or_path={self.model_name_or_path!r})")
