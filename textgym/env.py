"""``TextGen-v0``: text generation as a Gymnasium environment, one token per step."""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textgym import assets, chat
from textgym.prompts import as_prompt_list
from textgym.rendering import text_frame
from textgym.rewards import as_reward_fn, reward_components
from textgym.spaces import TokenWindowSpace, tokenizer_fingerprint


@functools.lru_cache(maxsize=8)
def load_tokenizer(model_name_or_path: str):
    """``AutoTokenizer`` for a model name (textgym default, hub id or path), shared within a process.

    :raises textgym.assets.AssetError: the default model could not be fetched.
    :raises FileNotFoundError: a local path that does not exist (:func:`textgym.assets.check_model_path`).
    :raises OSError: transformers could not find the tokenizer (offline and not cached, bad path).
    """
    from transformers import AutoTokenizer

    assets.check_model_path(model_name_or_path)
    return AutoTokenizer.from_pretrained(assets.resolve_pretrained(model_name_or_path))


@functools.lru_cache(maxsize=8)
def fingerprint_of(model_name_or_path: str) -> str:
    """:func:`textgym.spaces.tokenizer_fingerprint` of :func:`load_tokenizer`'s tokenizer, computed once per process."""
    return tokenizer_fingerprint(load_tokenizer(model_name_or_path))


def encode_prompts(tokenizer, prompts: Sequence, chat_template: bool = False,
                   system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each prompt as :class:`TextGenEnv` lays it into the prompt window.

    :param tokenizer: a transformers tokenizer.
    :param prompts: strings, or in chat mode strings and conversations (lists of message dicts).
    :param chat_template: render through the chat template instead of tokenizing the plain text.
    :param system_prompt: chat mode: system message for prompts that have none.
    :return: one ``list[int]`` per prompt: ``tokenizer(prompt)["input_ids"]`` in continuation mode;
        ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` in chat mode, where
        ``messages`` is :func:`textgym.chat.chat_messages` of the prompt (each distinct string
        prompt rendered once).
    """
    if not chat_template:
        return [list(ids) for ids in tokenizer(list(prompts))["input_ids"]]
    rendered: dict[str, list[int]] = {}
    out = []
    for prompt in prompts:
        if isinstance(prompt, str) and prompt in rendered:
            out.append(list(rendered[prompt]))
            continue
        ids = chat.render_chat(tokenizer, chat.chat_messages(prompt, system_prompt))
        if isinstance(prompt, str):
            rendered[prompt] = ids
        out.append(list(ids))
    return out


def _check_state_keys(state: dict[str, Any], keys: Sequence[str], env_name: str) -> None:
    """Raise ``ValueError`` unless ``state`` has exactly ``keys`` (an episode state of ``env_name``)."""
    missing, unknown = sorted(set(keys) - set(state)), sorted(set(state) - set(keys))
    if missing or unknown:
        raise ValueError(f"not an episode state of {env_name}: missing {missing}, unknown {unknown}; "
                         f"pass what {env_name}.get_episode_state() returned")


def check_token_action(action, vocab_size: int, episode_done: bool) -> int:
    """The token id a text env's ``step`` received, as ``int``.

    :raises RuntimeError: the episode already ended (call ``reset()``).
    :raises ValueError: ``action`` is not an integer in ``[0, vocab_size)``.
    """
    if episode_done:
        raise RuntimeError("step() called on a finished episode; call reset() first")
    token = int(action)
    if token != action or not 0 <= token < vocab_size:
        raise ValueError(f"action {action!r} is not a token id in [0, {vocab_size})")
    return token


class TextGenEnv(gym.Env):
    """Generate a continuation of a prompt, one token per step; a reward model scores the result.

    ## Description
    Each episode draws a prompt, and the agent writes its continuation token by token (or, with
    ``chat_template=True``, the assistant's reply to it). This is the token-level MDP of PPO
    fine-tuning for language models (Ziegler et al. 2019, "Fine-Tuning
    Language Models from Human Preferences"; Ouyang et al. 2022): the state is the prompt plus the
    tokens generated so far, the action is the next token, and the reward arrives when the text
    is finished.

    ## Action Space
    ``Discrete(vocab_size)``: the id of the next token (``np.int64``). Ids outside ``[0, vocab_size)``
    raise ``ValueError``.

    ## Observation Space
    :class:`textgym.spaces.TokenWindowSpace`: ``{"input_ids": int64 (L,), "attention_mask": int8 (L,)}``
    with ``L = max_prompt_tokens + max_new_tokens``; the prompt is left-padded into the first
    ``max_prompt_tokens`` slots and generated tokens follow it. In chat mode the prompt slots hold
    the conversation rendered by the chat template up to and including the assistant header,
    token for token as ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``.
    The space records ``model_name_or_path`` so that a policy can load the matching model.

    ## Rewards
    0 on every step but the last. On the last step, the reward model's score of
    ``(prompt, completion)``, where ``completion`` is the decoded generated text without the stop
    token (in chat mode: the assistant's reply only) and ``prompt`` is the prompt string (for a
    conversation: its last message's content, :func:`textgym.chat.prompt_text`).
    ``info["reward_components"]`` lists what the reward is made of: ``{"score": ...}``, or every
    component a reward model returns (e.g. ``correct`` and ``format``, see
    :mod:`textgym.rewards`).

    ## Starting State
    A prompt drawn uniformly from the prompt source with ``self.np_random`` (or given as
    ``reset(options={"prompt": "..."})``) and no generated tokens.

    ## Episode End
    ``terminated=True`` when the agent emits a stop token (EOS; in chat mode also the template's
    end-of-turn token) or when ``max_new_tokens`` tokens have been generated: both end the
    generation, so neither is a time-limit truncation and the value of the final state is 0 (SB3
    bootstraps only ``truncated`` episodes). ``truncated`` is always False.

    ## Arguments
    - ``model_name_or_path``: tokenizer (and default policy) source: a hub id, a local directory, or
      :data:`textgym.assets.DEFAULT_MODEL` (SmolLM2-135M-Instruct, embedded, offline).
    - ``prompts``: prompt source, see :func:`textgym.prompts.as_prompt_list`; default: openings of
      human-written movie-review sentences (training split). ``prompt_column`` names the column of
      a ``datasets.Dataset``.
    - ``reward_model``: see :func:`textgym.rewards.as_reward_fn`; default: sentiment of
      ``prompt + completion`` (:class:`textgym.rewards.finetuned.FineTunedRewardModel`, via
      :func:`textgym.rewards.default_reward_model`).
    - ``max_prompt_tokens``: the prompt window; a longer prompt raises ``ValueError``. ``None``:
      the longest prompt of the source.
    - ``max_new_tokens``: the generation limit (episode length limit).
    - ``vocab_size``: action-space size; default ``len(tokenizer)``. Set it to the model's
      (padded) vocabulary size where that differs.
    - ``eos_token_id``: the stop token(s) that end a generation: an id or a list of ids (as in
      ``GenerationConfig.eos_token_id``); ``-1`` (default): the tokenizer's EOS and, in chat mode,
      the template's end-of-turn token (:func:`textgym.chat.end_of_turn_token_id`; ``<|im_end|>``
      for SmolLM2); ``None``: no stop token, only ``max_new_tokens`` ends an episode.
    - ``chat_template``: render every prompt through the tokenizer's chat template with the
      generation prompt added (instruct models). Prompts may then also be conversations, lists of
      ``{"role", "content"}`` messages. A tokenizer without a chat template raises ``ValueError``.
    - ``system_prompt``: chat mode only: a system message put before every prompt that has none.
    - ``render_mode``: ``"ansi"`` (``render()`` returns prompt + completion text), ``"human"``
      (every finished episode's text and reward are printed to stdout, as Gymnasium's toy-text
      envs print their state; ``render()`` returns ``None``; what ``rl_zoo3.enjoy`` asks for),
      ``"rgb_array"`` (``render()`` returns the ``"ansi"`` text drawn as a ``uint8`` frame of shape
      ``(360, 640, 3)``, :func:`textgym.rendering.text_frame`, for video recorders; SB3's
      ``make_vec_env`` asks for this mode) or ``None``.

    The constructor tokenizes every prompt and calls the reward model once on the first prompt
    with an empty completion, so bad input fails here rather than during training.

    ## Version History
    - v0: initial version; chat mode (``chat_template``, ``system_prompt``), several stop ids
      and named reward components added without changing the default behaviour.
    """

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        model_name_or_path: str = assets.DEFAULT_MODEL,
        prompts: Any = None,
        reward_model: Any = None,
        max_prompt_tokens: int | None = 32,
        max_new_tokens: int = 24,
        prompt_column: str = "prompt",
        vocab_size: int | None = None,
        eos_token_id: int | Sequence[int] | None = -1,
        chat_template: bool = False,
        system_prompt: str | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            # TypeError, not ValueError: Gymnasium's make and SB3's make_vec_env treat a TypeError
            # from the constructor as "this render mode is not supported".
            raise TypeError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.chat_template, self.system_prompt = bool(chat_template), system_prompt
        if self.chat_template:
            chat.check_chat_template(self.tokenizer, model_name_or_path)
        elif system_prompt is not None:
            raise ValueError("system_prompt is only used with chat_template=True")
        self.stop_token_ids = chat.stop_token_ids(self.tokenizer, eos_token_id, self.chat_template)
        vocab_size = len(self.tokenizer) if vocab_size is None else vocab_size

        self.prompts = as_prompt_list(prompts, prompt_column, allow_messages=self.chat_template)
        self._prompt_ids = self.encode_prompts(self.prompts)
        if max_prompt_tokens is None:
            max_prompt_tokens = max(len(ids) for ids in self._prompt_ids)
        self._check_prompt_tokens(self.prompts, self._prompt_ids, max_prompt_tokens)

        self.observation_space = TokenWindowSpace(vocab_size, max_prompt_tokens, max_new_tokens, model_name_or_path,
                                                  tokenizer_fingerprint=fingerprint_of(model_name_or_path))
        self.action_space = spaces.Discrete(vocab_size)
        self.max_new_tokens = max_new_tokens
        self.reward_fn = as_reward_fn(reward_model)
        reward_components(self.reward_fn([chat.prompt_text(self.prompts[0])], [""]), 1)

        self._prompt: str | list[dict] = ""
        self._episode_info: dict[str, Any] = {}
        self._prompt_tokens: list[int] = []
        self._generated: list[int] = []
        self._done = True
        self._provided_score: dict[str, float] | None = None  # see provide_score

    @property
    def eos_token_id(self) -> int | None:
        """The stop token when there is exactly one (``None`` otherwise); see ``stop_token_ids``."""
        return next(iter(self.stop_token_ids)) if len(self.stop_token_ids) == 1 else None

    def encode_prompts(self, prompts: list) -> list[list[int]]:
        """Token ids of each prompt as the policy sees it (:func:`encode_prompts` with this env's settings)."""
        return encode_prompts(self.tokenizer, prompts, self.chat_template, self.system_prompt)

    @staticmethod
    def _check_prompt_tokens(prompts: list[str], prompt_ids: list[list[int]], limit: int, label: str = "prompt #{}") -> None:
        for i, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
            name = f"{label.format(i)} ({chat.prompt_text(prompt)[:80]!r})"
            if not ids:
                raise ValueError(f"{name} tokenizes to no tokens; every prompt needs at least one")
            if len(ids) > limit:
                raise ValueError(f"{name} is {len(ids)} tokens, longer than max_prompt_tokens={limit}; "
                                 "raise max_prompt_tokens or shorten the prompt")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode: draw a prompt (``self.np_random``) or take ``options["prompt"]``.

        :return: ``(observation, info)``; ``info = {"prompt": str}``, the prompt's text
            (:func:`textgym.chat.prompt_text`), plus ``info["messages"]`` (the rendered
            conversation, system prompt included) in chat mode.
        :raises ValueError: ``options["prompt"]`` is not a valid prompt (empty, a conversation
            outside chat mode) or longer than ``max_prompt_tokens``.
        """
        super().reset(seed=seed)
        if options and "prompt" in options:
            prompt = as_prompt_list([options["prompt"]], allow_messages=self.chat_template)[0]
            tokens = self.encode_prompts([prompt])[0]
            self._check_prompt_tokens([prompt], [tokens], self.observation_space.prompt_length, "options['prompt']")
            self._prompt, self._prompt_tokens = prompt, tokens
        else:
            index = int(self.np_random.integers(len(self.prompts)))
            self._prompt, self._prompt_tokens = self.prompts[index], list(self._prompt_ids[index])
        self._generated = []
        self._done = False
        self._provided_score = None
        # Built once per episode; every step's info starts from a shallow copy of it.
        self._episode_info = {"prompt": chat.prompt_text(self._prompt)}
        if self.chat_template:
            self._episode_info["messages"] = chat.chat_messages(self._prompt, self.system_prompt)
        return self.observation_space.encode(self._prompt_tokens, self._generated), dict(self._episode_info)

    def step(self, action):
        """Append token ``action``; score the text if the generation ended.

        :return: ``(observation, reward, terminated, truncated=False, info)``; at the last step
            ``info`` holds ``prompt``, ``completion`` and ``reward_components``.
        :raises ValueError: ``action`` is not a token id of the action space.
        :raises RuntimeError: the episode already ended (call ``reset()``).
        """
        token = check_token_action(action, self.action_space.n, self._done)
        if self._provided_score is not None and not self._ends_episode(token):
            raise RuntimeError("provide_score() was called for a text this step does not finish; "
                               "pass the action given to text_to_score()")
        self._generated.append(token)
        terminated = self._ends_episode(token, appended=True)
        observation = self.observation_space.encode(self._prompt_tokens, self._generated)
        info = dict(self._episode_info)
        reward = 0.0
        if terminated:
            self._done = True
            completion = self.completion()
            scores = self._provided_score or {k: float(v[0]) for k, v in
                                              reward_components(self.reward_fn([info["prompt"]], [completion]), 1).items()}
            reward = scores["score"]
            info.update(completion=completion, reward_components=scores)
            if self.render_mode == "human":
                print(f"{self._text()}  [reward {reward:+.3f}]", flush=True)
        return observation, reward, terminated, False, info

    EPISODE_STATE_KEYS = ("prompt", "prompt_tokens", "generated", "done", "episode_info")
    """The keys of :meth:`get_episode_state`."""

    def get_episode_state(self) -> dict[str, Any]:
        """The episode in progress, as a deep copy (for :func:`agents.training.resume.save_training_state`).

        :return: ``prompt`` (the prompt string or conversation), ``prompt_tokens`` and ``generated``
            (``list[int]``), ``done`` (``bool``: the episode ended, ``reset()`` is due) and
            ``episode_info`` (the ``info`` every step starts from). Not included: ``self.np_random``
            (Gymnasium's generator; save it separately) and the reward model, which is built by the
            constructor and assumed to hold no state between calls.
        """
        return copy.deepcopy({"prompt": self._prompt, "prompt_tokens": self._prompt_tokens,
                              "generated": self._generated, "done": self._done, "episode_info": self._episode_info})

    def set_episode_state(self, state: dict[str, Any]) -> None:
        """Continue the episode ``state`` (from :meth:`get_episode_state` of an env built with the same
        arguments): the next ``step`` appends to its tokens. ``self.np_random`` is not touched.

        :raises ValueError: a key is missing or unknown, or the tokens do not fit this env's windows.
        """
        _check_state_keys(state, self.EPISODE_STATE_KEYS, type(self).__name__)
        space = self.observation_space
        if len(state["prompt_tokens"]) > space.prompt_length or len(state["generated"]) > self.max_new_tokens:
            raise ValueError(f"the episode state holds {len(state['prompt_tokens'])} prompt and {len(state['generated'])} "
                             f"generated tokens, more than this env's windows ({space.prompt_length}, "
                             f"{self.max_new_tokens}); build the env with the arguments of the env it was saved from")
        state = copy.deepcopy(state)
        self._prompt, self._prompt_tokens, self._generated = state["prompt"], state["prompt_tokens"], state["generated"]
        self._done, self._episode_info = bool(state["done"]), state["episode_info"]

    def _ends_episode(self, token: int, appended: bool = False) -> bool:
        """Whether emitting ``token`` ends the episode (``appended``: it is already in ``_generated``)."""
        return token in self.stop_token_ids or len(self._generated) + (not appended) >= self.max_new_tokens

    def text_to_score(self, action) -> tuple[str, str] | None:
        """The ``(prompt, completion)`` that ``step(action)`` would score, or ``None`` when ``action``
        does not end the episode. For :class:`textgym.vec_env.BatchedRewards`, which scores the
        texts of many envs in one reward-model call and hands each env its score
        (:meth:`provide_score`) before stepping it.

        :raises ValueError: ``action`` is not a token id of the action space.
        :raises RuntimeError: the episode already ended.
        """
        token = check_token_action(action, self.action_space.n, self._done)
        if not self._ends_episode(token):
            return None
        return self._episode_info["prompt"], self.completion(self._generated + [token])

    def provide_score(self, components: dict[str, float]) -> None:
        """The reward components (``{"score": float, ...}``) of the text the next ``step`` finishes,
        computed by the caller (:class:`textgym.vec_env.BatchedRewards`): that step returns them
        instead of calling the reward model. Used once; cleared at ``reset``.

        :raises ValueError: ``components`` has no ``"score"``.
        """
        if "score" not in components:
            raise ValueError(f"provide_score needs a 'score' component, got {sorted(components)}")
        self._provided_score = {name: float(value) for name, value in components.items()}

    def completion(self, tokens: Sequence[int] | None = None) -> str:
        """The generated text so far (or of ``tokens``), without the stop token and other special tokens."""
        tokens = self._generated if tokens is None else list(tokens)
        if tokens and tokens[-1] in self.stop_token_ids:
            tokens = tokens[:-1]
        if self.chat_template:  # a reply is a turn of its own, not a continuation of the prompt text
            return self.tokenizer.decode(tokens, skip_special_tokens=True)
        # Decoding prompt and continuation together keeps the separator a tokenizer inserts
        # between them (e.g. the space between words of a word-level tokenizer).
        prefix = self.tokenizer.decode(self._prompt_tokens, skip_special_tokens=True)
        full = self.tokenizer.decode(self._prompt_tokens + tokens, skip_special_tokens=True)
        if full.startswith(prefix):
            return full[len(prefix):]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: the prompt (in chat mode: the rendered conversation) followed by the completion
        so far; ``"rgb_array"``: that text as a ``uint8`` frame ``(360, 640, 3)``; ``None`` otherwise
        (``"human"`` prints at each episode's end instead)."""
        if self.render_mode == "rgb_array":
            return text_frame(self._text())
        return self._text() if self.render_mode == "ansi" else None

    def _text(self) -> str:
        prompt = self.tokenizer.decode(self._prompt_tokens) if self.chat_template else self._prompt
        return prompt + self.completion()
