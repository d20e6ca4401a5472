"""Chat prompts: render prompts through a tokenizer's chat template and find its end-of-turn token.

Instruct models are trained on conversations laid out by their chat template (e.g. ChatML for
SmolLM2: ``<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``); prompting them with raw
text wastes what instruction tuning taught them. :class:`textgym.env.TextGenEnv` with
``chat_template=True`` uses these helpers to render each prompt exactly as
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` does, and to stop the
reply at the template's end-of-turn token.

A prompt is a string (one user message) or a list of ``{"role": str, "content": str}`` messages,
the conversational format of TRL and ``datasets``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

Messages = list[dict[str, str]]


def is_messages(prompt: Any) -> bool:
    """True if ``prompt`` is a non-empty list/tuple of dicts (a conversation), however well formed."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(isinstance(m, dict) for m in prompt)


def check_messages(prompt: Any, name: str = "prompt") -> None:
    """Check one conversation: every message a dict with string ``role`` and ``content``, the last one
    not blank (it is what the reply answers).

    :raises ValueError: a malformed message (the message says which and why).
    """
    for j, message in enumerate(prompt):
        if not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            raise ValueError(f"{name} message #{j} is {message!r}: each message needs a string 'role' and 'content'")
    if not prompt[-1]["content"].strip():
        raise ValueError(f"{name}: the last message has no content")


def chat_messages(prompt: str | Sequence[dict], system_prompt: str | None = None) -> Messages:
    """The conversation a prompt stands for: a string becomes one user message; ``system_prompt``
    (if given) goes first unless the conversation already starts with a system message."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def prompt_text(prompt: str | Sequence[dict]) -> str:
    """The text of a prompt as the reward model sees it: the string itself, or the content of the
    conversation's last message (the question being answered)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def check_chat_template(tokenizer: Any, model_name_or_path: str) -> None:
    """:raises ValueError: the tokenizer has no chat template (with what to do instead)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer of {model_name_or_path!r} has no chat template, so chat_template=True cannot "
            "render prompts; use an instruct model, set tokenizer.chat_template, or chat_template=False "
            "(plain continuation of the prompt text)"
        )


def render_chat(tokenizer: Any, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` laid out by the chat template (``apply_chat_template``, tokenized).

    :return: ``list[int]``, ending with the assistant header when ``add_generation_prompt``.
    """
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token: the named ones and added tokens flagged special (e.g. ``<|im_end|>``)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def end_of_turn_token_id(tokenizer: Any) -> int | None:
    """The token the chat template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``, ...), found by rendering a one-word reply: the first special token after
    the reply's text.

    :return: the token id, or ``None`` when the template closes turns with no special token.
    """
    user = [{"role": "user", "content": "Hi"}]
    prompt = render_chat(tokenizer, user, add_generation_prompt=True)
    full = render_chat(tokenizer, [*user, {"role": "assistant", "content": "Hi"}], add_generation_prompt=False)
    special = special_token_ids(tokenizer) - {tokenizer.unk_token_id}  # "Hi" may be unknown to a small vocabulary
    if full[:len(prompt)] == prompt:
        return next((i for i in full[len(prompt):] if i in special), None)
    # The template rewrote earlier turns: the closing token is then the last special token.
    return next((i for i in reversed(full) if i in special), None)


def stop_token_ids(tokenizer: Any, eos_token_id: Any, chat_template: bool) -> frozenset[int]:
    """The token ids that end a generation (or, in a dialogue, a turn).

    :param eos_token_id: ``-1``: the tokenizer's EOS and, with ``chat_template``, the template's
        end-of-turn token (:func:`end_of_turn_token_id`); ``None``: none; an id or a list of ids
        (as ``GenerationConfig.eos_token_id``).
    :raises ValueError: anything else (negative or non-integer ids).
    """
    if eos_token_id is None:
        return frozenset()
    if eos_token_id == -1:
        ids = {tokenizer.eos_token_id, end_of_turn_token_id(tokenizer) if chat_template else None}
        return frozenset(i for i in ids if i is not None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not all(isinstance(i, int) and i >= 0 for i in ids):
        raise ValueError(f"eos_token_id must be a token id, a list of token ids, -1 or None; got {eos_token_id!r}")
    return frozenset(ids)


_SENTINEL = "textgym-sentinel"
"""Stand-in message content used to find where the template puts a turn's closing text."""

_STAND_IN = ({"role": "user", "content": _SENTINEL + "0"}, {"role": "assistant", "content": _SENTINEL + "1"})
"""A two-message conversation whose assistant turn is closed: the base of both renderings below."""


def _closed_turn(tokenizer: Any) -> str:
    """:data:`_STAND_IN` rendered by ``tokenizer``'s chat template, once per tokenizer and template
    (:func:`next_turn_text` needs it at the end of every turn)."""
    return _render_stand_in(tokenizer, str(tokenizer.chat_template))  # str: a dict of named templates is unhashable


@functools.lru_cache(maxsize=8)
def _render_stand_in(tokenizer: Any, chat_template: str) -> str:
    return tokenizer.apply_chat_template(list(_STAND_IN), tokenize=False)


def turn_closing(tokenizer: Any) -> str:
    """The text the chat template writes right after an assistant reply's content (``"<|im_end|>\\n"``
    for ChatML): what closes the agent's turn before the next message opens.

    :raises ValueError: the template does not render the reply's content verbatim.
    """
    text, reply = _closed_turn(tokenizer), _STAND_IN[1]["content"]
    if reply not in text:
        raise ValueError("the chat template does not write an assistant reply verbatim, so turns cannot be appended")
    return text[text.rindex(reply) + len(reply):]


def next_turn_text(tokenizer: Any, message: str, role: str = "user") -> str:
    """The text the chat template adds for one more message after a closed assistant turn, up to
    and including the next assistant header (the generation prompt).

    Computed as the difference of two renderings,
    ``apply_chat_template(conversation + [message], add_generation_prompt=True)`` minus
    ``apply_chat_template(conversation)``, on a stand-in two-message conversation.

    :param message: the new message's content.
    :param role: its role (``"user"``; some templates also accept ``"tool"``).
    :raises ValueError: the template rewrites earlier turns when a message is added (the rendering
        of the longer conversation does not start with the shorter one).
    """
    before = _closed_turn(tokenizer)
    after = tokenizer.apply_chat_template([*_STAND_IN, {"role": role, "content": message}],
                                          add_generation_prompt=True, tokenize=False)
    if not after.startswith(before):
        raise ValueError("the chat template rewrites earlier turns when a message is added (e.g. it drops past "
                         "reasoning), so a multi-turn observation cannot grow by appending; use another template")
    return after[len(before):]
