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


def tiny_tokenizer(words: tuple[str, ...] = TINY_WORDS, chat: bool = False):
    """The whitespace word-level tokenizer of the tiny models (``PreTrainedTokenizerFast``).

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then (with ``chat``) ``<|im_start|>`` 3 and
    ``<|im_end|>`` 4, then ``words`` in order; ``len(tokenizer)`` is the vocabulary size a tiny model
    needs. ``decode`` joins words with single spaces. With ``chat`` the tokenizer has a ChatML chat
    template (:data:`CHAT_TEMPLATE`) whose role names ``system``, ``user`` and ``assistant`` are added
    to the words if missing.

    :param words: vocabulary words (no whitespace inside a word).
    :param chat: add the chat tokens and template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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
    return tokenizer


def save_tiny_lm(path: str | Path, words: tuple[str, ...] = TINY_WORDS, n_layer: int = 2,
                 n_embd: int = 32, n_head: int = 2, n_positions: int = 64, seed: int = 0,
                 chat: bool = False) -> Path:
    """Write a random GPT-2 (``GPT2LMHeadModel``) and a whitespace word-level tokenizer to ``path``.

    Token ids: ``<pad>`` 0, ``<unk>`` 1, ``<eos>`` 2, then (with ``chat``) ``<|im_start|>`` 3 and
    ``<|im_end|>`` 4, then ``words`` in order. ``decode`` joins words with single spaces.
    With ``chat`` the tokenizer has a ChatML chat template (:data:`CHAT_TEMPLATE`) whose role
    names ``system``, ``user`` and ``assistant`` are added to the words if missing.
    Other architectures: :func:`save_tiny_causal_lm`.

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
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer(words, chat)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, bos_token_id=2, eos_token_id=2, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


TINY_SIZES = dict(hidden_size=32, intermediate_size=64, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
"""Sizes of :func:`save_tiny_causal_lm`'s models, under the usual config names; each config class
takes those of its ``__init__`` arguments and ``attribute_map`` aliases that it has (OPT's
``ffn_dim`` is the others' ``intermediate_size``; GPT-2 takes none of ``intermediate_size``,
``num_key_value_heads`` and ``head_dim``)."""


def save_tiny_causal_lm(path: str | Path, config_class, words: tuple[str, ...] = TINY_WORDS, seed: int = 0,
                        chat: bool = False, **overrides) -> Path:
    """Write a random causal LM of any architecture and the tiny tokenizer (:func:`tiny_tokenizer`) to ``path``.

    The model is ``AutoModelForCausalLM.from_config`` of ``config_class`` built with
    :data:`TINY_SIZES` (hidden size 32, 2 layers, 4 query and 2 key/value heads of size 8, 64
    positions), the tokenizer's vocabulary size and its token ids (``<pad>`` 0, ``<eos>`` 2 also
    as BOS), then ``overrides``. Sizes a config class does not take are left out; ``head_dim`` is
    ``hidden_size // num_attention_heads`` unless overridden.

    ``AutoTokenizer`` loads the tokenizer back from ``path`` for most model types, but not for
    ``qwen2``: transformers 5 loads every Qwen2 directory's tokenizer as ``Qwen2Tokenizer``
    (byte-level BPE) whatever ``tokenizer_config.json`` says, which encodes the words to no tokens.
    For such a model, save :func:`tiny_tokenizer` to a directory of its own for the env and give
    the policy the model's path (``policy_kwargs=dict(model_name_or_path=...)``).

    :param path: directory to create (or overwrite).
    :param config_class: a transformers config class (``LlamaConfig``) or a model type (``"llama"``).
    :param words: vocabulary words of the tokenizer.
    :param seed: ``torch.manual_seed`` for the random weights.
    :param chat: tokenizer with the chat tokens and template.
    :param overrides: further config arguments (``sliding_window=4``, ``final_logit_softcapping=30.0``,
        ``hidden_size=64``, ...); they win over the defaults and are passed even if not in the
        config's signature.
    :return: ``path`` as a ``Path``.
    """
    import inspect

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if isinstance(config_class, str):
        config_class = type(AutoConfig.for_model(config_class))
    tokenizer = tiny_tokenizer(words, chat)
    accepted = {*inspect.signature(config_class.__init__).parameters,
                *getattr(config_class, "attribute_map", {})}
    kwargs = {**{k: v for k, v in TINY_SIZES.items() if k in accepted}, "vocab_size": len(tokenizer),
              "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2, **overrides}
    if "head_dim" in kwargs and "head_dim" not in overrides:  # follow an overridden hidden size or head count
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    config = config_class(**kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
