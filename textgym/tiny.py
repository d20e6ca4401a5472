"""Tiny randomly initialised language models with a word-level tokenizer, for tests and synthetic tasks.

They save with ``save_pretrained`` like any hub model, so everything that takes a
``model_name_or_path`` takes their directory, offline, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

TINY_WORDS = ("good", "bad", "movie", "film", "the", "a", "is", "was", "very", "not",
              "one", "two", "three", "four", "five", "six")
"""Default vocabulary of the tiny tokenizer, after the special tokens ``<pad> <unk> <eos>``."""


CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
"""Special tokens of the tiny chat template (ChatML, as SmolLM2 and Qwen use), ids 3 and 4 with ``chat=True``."""

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""ChatML as a Jinja template: ``<|im_start|>{role}\n{content}<|im_end|>\n`` per message."""


def save_tiny_lm(path: str | Path, words: tuple[str, ...] = TINY_WORDS, n_layer: int = 2,
                 n_embd: int = 32, n_head: int = 2, n_positions: int = 64, seed: int = 0,
                 chat: bool = False) -> Path:
    """Write a random GPT-2 (``GPT2LMHeadModel``) and a whitespace word-level tokenizer to ``path``.

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then (with ``chat``) ``<|im_start|>`` 3 and
    ``<|im_end|>`` 4, then ``words`` in order. ``decode`` joins words with single spaces.
    With ``chat`` the tokenizer has a ChatML chat template (:data:`CHAT_TEMPLATE`) whose role
    names ``system``, ``user`` and ``assistant`` are added to the words if missing.

    :param path: directory to create (or overwrite).
    :param words: vocabulary words (no whitespace inside a word).
    :param n_layer: transformer blocks.
    :param n_embd: hidden size.
    :param n_head: attention heads.
    :param n_positions: maximum sequence length.
    :param seed: ``torch.manual_seed`` for the random weights.
    :param chat: add the chat tokens and template (a tiny instruct model).
    :return: ``path`` as a ``Path``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    special = ("<pad>", "<unk>", "<eos>", *(CHAT_TOKENS if chat else ()))
    if chat:
        words = (*words, *(role for role in ("system", "user", "assistant") if role not in words))
    vocab = {tok: i for i, tok in enumerate((*special, *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="<eos>", extra_special_tokens=list(CHAT_TOKENS) if chat else [])
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
