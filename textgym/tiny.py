"""Tiny randomly initialised language models with a word-level tokenizer, for tests and synthetic tasks.

They save with ``save_pretrained`` like any hub model, so everything that takes a
``model_name_or_path`` takes their directory, offline, in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

TINY_WORDS = ("good", "bad", "movie", "film", "the", "a", "is", "was", "very", "not",
              "one", "two", "three", "four", "five", "six")
"""Default vocabulary of the tiny tokenizer, after the special tokens ``<pad> <unk> <eos>``."""


def save_tiny_lm(path: str | Path, words: tuple[str, ...] = TINY_WORDS, n_layer: int = 2,
                 n_embd: int = 32, n_head: int = 2, n_positions: int = 64, seed: int = 0) -> Path:
    """Write a random GPT-2 (``GPT2LMHeadModel``) and a whitespace word-level tokenizer to ``path``.

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then ``words`` in order; ``vocab_size =
    len(words) + 3``. ``decode`` joins words with single spaces.

    :param path: directory to create (or overwrite).
    :param words: vocabulary words (no whitespace inside a word).
    :param n_layer: transformer blocks.
    :param n_embd: hidden size.
    :param n_head: attention heads.
    :param n_positions: maximum sequence length.
    :param seed: ``torch.manual_seed`` for the random weights.
    :return: ``path`` as a ``Path``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(("<pad>", "<unk>", "<eos>", *words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                        unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
