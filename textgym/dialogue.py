"""Multi-turn dialogue as a token-level environment: the agent writes each reply token by token,
a game answers between replies, and the episode spans the whole game.

Turn-level libraries (TextArena, GEM, verifiers) step once per whole reply. Here every step is
still one token: the observation holds the whole conversation so far, the game's answers are
appended to it as context tokens that were never actions, and the reward arrives when a turn (or
the game) ends. So PPO's per-token credit assignment, the KL penalty and the episode-grouped
update apply to multi-turn games unchanged: a transition exists only for an agent token.

A game is anything with :class:`DialogueGame`'s two methods; :class:`DialogueEnv` wraps it.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from textgym import assets, chat
from textgym.env import _check_state_keys, check_token_action, fingerprint_of, load_tokenizer
from textgym.rendering import text_frame
from textgym.spaces import TokenWindowSpace


class DialogueGame(abc.ABC):
    """A turn-based text game: it opens with a message, then answers each reply of the agent.

    Implement :meth:`reset` and :meth:`respond` (and :meth:`info` for extra episode data)::

        class Echo(DialogueGame):
            def reset(self, seed=None):
                self.secret = random.Random(seed).choice(["good", "bad"])
                return "Say anything."
            def respond(self, reply):
                if not hasattr(self, "told"):
                    self.told = True
                    return self.secret, 0.0, False       # answer, reward of this turn, game over?
                return None, float(reply == self.secret), True

    Rewards are per turn: the value :meth:`respond` returns is given at the agent's last token
    of that reply, so a game that scores only at its end returns 0 until then.
    """

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> str:
        """Start a new game.

        :param seed: seed for the game's randomness (drawn from the env's ``np_random``).
        :return: the first message (the user turn the agent answers first).
        """

    @abc.abstractmethod
    def respond(self, reply: str) -> tuple[str | None, float, bool]:
        """Take the agent's reply (decoded, without the end-of-turn token).

        :return: ``(message, reward, done)``: the game's answer (``None`` or ignored when
            ``done``), the reward of this turn, and whether the game is over.
        """

    def info(self) -> dict[str, Any]:
        """Extra data for the episode's final ``info["game_info"]`` (default: none)."""
        return {}


def as_game(game: DialogueGame | Callable[[], DialogueGame]) -> DialogueGame:
    """A fresh game for one env: a :class:`DialogueGame` instance is deep-copied (vectorised envs
    built from one set of keyword arguments then never share a game's state); a class or another
    callable is called with no arguments.

    :raises TypeError: ``game`` is neither, or the callable does not return a ``DialogueGame``.
    """
    if isinstance(game, DialogueGame):
        return copy.deepcopy(game)
    made = game() if callable(game) else None
    if not isinstance(made, DialogueGame):
        raise TypeError(f"game must be a textgym.dialogue.DialogueGame (instance, subclass or factory), got {game!r}")
    return made


class DialogueEnv(gym.Env):
    """A multi-turn game played token by token through the model's chat template.

    ## Description
    The game's first message is rendered as a user turn (after ``system_prompt``, if any) with
    the assistant header, exactly as ``apply_chat_template(messages, add_generation_prompt=True)``.
    The agent writes its reply one token per step until it emits a stop token (the template's
    end-of-turn token or EOS) or has written ``max_reply_tokens`` tokens. The reply's text goes to
    the game (:meth:`DialogueGame.respond`); unless the game is over, its answer is appended to
    the observation as the template renders a new user turn (closing the agent's turn first if
    the agent did not) followed by the next assistant header, and the agent writes its next
    reply. Those context tokens are never actions: they have no step, no log-prob and no KL term.

    ## Action Space
    ``Discrete(vocab_size)``: the id of the agent's next token.

    ## Observation Space
    :class:`textgym.spaces.TokenWindowSpace` with ``prompt_length = max_prompt_tokens`` and
    ``max_new_tokens = max_context_tokens``; ``L = max_prompt_tokens + max_context_tokens``::

        [ pad | first turn (system, user, assistant header) ][ reply 1 | game answer 1 | reply 2 | ... | pad ]
          <----------- max_prompt_tokens ------------------><------------- max_context_tokens ----------->

    The first turn is left-padded into its window; everything after it, the agent's tokens and the
    game's, follows in order. Each observation is therefore a prefix of the next one, which the
    KV-cached rollout and the one-forward-per-episode update rely on. Nothing is ever dropped or
    shifted: when the context window is full the episode ends (see Episode End). Size the window
    for the longest game you want to train on (``policy`` positions permitting).

    ## Rewards
    The game's reward for a turn, at the agent's last token of that turn; 0 on all other steps.

    ## Episode End
    - ``terminated``: the game is over (:meth:`DialogueGame.respond` returned ``done``).
    - ``truncated``: the game would go on, but ``max_turns`` replies were written or the game's
      next answer plus one more token does not fit in ``max_context_tokens`` (a reply cut by a
      full window is still sent to the game first). SB3 bootstraps truncated episodes with the
      value of the last observation, which is right here: the game was not over.

    ## Info
    Every step: ``prompt`` (the first message) and ``turn`` (replies finished). At a turn's end
    also ``reply`` and ``message`` (the game's answer or ``None``). At the episode's end
    ``completion`` (the agent's replies joined by newlines), ``messages`` (the conversation),
    ``game_info`` (:meth:`DialogueGame.info`) and ``reward_components``: ``{"score": the episode's
    return}`` plus every number or bool in ``game_info`` (as floats), which
    :func:`agents.evaluate_against_reference` reports as columns (e.g. ``win``, ``invalid_move``).

    ## Arguments
    - ``game``: a :class:`DialogueGame` instance (deep-copied per env), class, or factory.
    - ``model_name_or_path``: the tokenizer and chat template (default: SmolLM2-135M-Instruct).
    - ``max_prompt_tokens``, ``max_context_tokens``: the two windows above.
    - ``max_reply_tokens``: per-turn token limit; a reply cut by it is closed with the template's
      end-of-turn text before the game's answer.
    - ``max_turns``: replies per episode before truncation (``None``: no limit but the window).
    - ``system_prompt``: a system message before the first turn.
    - ``eos_token_id``: stop ids that end a *turn*: ``-1`` (default) the tokenizer's EOS and the
      template's end-of-turn token, or an id or list of ids.
    - ``vocab_size``: action-space size; default ``len(tokenizer)``.
    - ``render_mode``: ``"ansi"`` (``render()`` returns the conversation so far, as tokens decoded),
      ``"human"`` (each finished episode's conversation and return are printed), ``"rgb_array"``
      (that text drawn as a ``uint8`` frame ``(360, 640, 3)``, for video recorders; SB3's
      ``make_vec_env`` asks for this mode) or ``None``.

    The constructor checks the chat template (it must render replies verbatim and append turns
    without rewriting earlier ones) and plays one ``reset`` of the game, so a game that cannot
    start, or a first turn longer than ``max_prompt_tokens``, fails here.

    :raises ValueError: no chat template, a template that rewrites turns, bad token ids, a first
        turn that does not fit, or a non-positive size.
    :raises TypeError: ``game`` is not a :class:`DialogueGame` or a factory of one;
        ``render_mode`` is not one of ``metadata["render_modes"]`` or ``None``.
    """

    metadata = {"render_modes": ["ansi", "human", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
        game: DialogueGame | Callable[[], DialogueGame],
        model_name_or_path: str = assets.DEFAULT_MODEL,
        max_prompt_tokens: int = 256,
        max_context_tokens: int = 256,
        max_reply_tokens: int = 32,
        max_turns: int | None = None,
        system_prompt: str | None = None,
        eos_token_id: int | Sequence[int] | None = -1,
        vocab_size: int | None = None,
        render_mode: str | None = None,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise TypeError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        for name, value in (("max_reply_tokens", max_reply_tokens), ("max_turns", max_turns or 1)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.render_mode = render_mode
        self.game = as_game(game)
        self.tokenizer = load_tokenizer(model_name_or_path)
        chat.check_chat_template(self.tokenizer, model_name_or_path)
        self.system_prompt = system_prompt
        self.stop_token_ids = chat.stop_token_ids(self.tokenizer, eos_token_id, chat_template=True)
        self._closing = chat.turn_closing(self.tokenizer)
        chat.next_turn_text(self.tokenizer, "x")  # fails now if the template rewrites turns
        eot = chat.end_of_turn_token_id(self.tokenizer)
        self._eot_text = None if eot is None else self.tokenizer.decode([eot])

        vocab_size = len(self.tokenizer) if vocab_size is None else vocab_size
        self.observation_space = TokenWindowSpace(vocab_size, max_prompt_tokens, max_context_tokens, model_name_or_path,
                                                  tokenizer_fingerprint=fingerprint_of(model_name_or_path))
        self.action_space = spaces.Discrete(vocab_size)
        self.max_context_tokens = int(max_context_tokens)
        self.max_reply_tokens = int(max_reply_tokens)
        self.max_turns = max_turns

        self._first = ""
        self._messages: list[dict[str, str]] = []
        self._prompt_tokens: list[int] = []
        self._context: list[int] = []
        self._reply: list[int] = []
        self._replies: list[str] = []
        self._done = True
        # A game that cannot start, or a first turn that does not fit, fails here. Env.reset is not
        # called: it would seed self.np_random, and unseeded envs would then all play the same games.
        self._start_game(game_seed=0)
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start a game, seeded from ``self.np_random``.

        :return: ``(observation, info)`` with ``info = {"prompt": first message, "turn": 0}``.
        :raises ValueError: the first turn is longer than ``max_prompt_tokens``.
        """
        super().reset(seed=seed)
        self._start_game(int(self.np_random.integers(2**31)))
        return self._observation(), {"prompt": self._first, "turn": 0}

    def _start_game(self, game_seed: int) -> None:
        first = self.game.reset(seed=game_seed)
        self._first = first
        self._messages = chat.chat_messages(first, self.system_prompt)
        self._prompt_tokens = chat.render_chat(self.tokenizer, self._messages)
        limit = self.observation_space.prompt_length
        if len(self._prompt_tokens) > limit:
            raise ValueError(f"the game's first turn is {len(self._prompt_tokens)} tokens, longer than "
                             f"max_prompt_tokens={limit} ({first[:80]!r}...); raise max_prompt_tokens")
        self._context, self._reply, self._replies = [], [], []
        self._return = 0.0
        self._done = False

    def step(self, action):
        """Append the agent's token; when its turn ends, let the game answer.

        :return: ``(observation, reward, terminated, truncated, info)``, see the class doc.
        :raises ValueError: ``action`` is not a token id; the game returned no message while going on.
        :raises RuntimeError: the episode already ended.
        """
        token = check_token_action(action, self.action_space.n, self._done)
        self._reply.append(token)
        self._context.append(token)
        info = {"prompt": self._first, "turn": len(self._replies)}
        window_full = len(self._context) >= self.max_context_tokens
        if not (token in self.stop_token_ids or len(self._reply) >= self.max_reply_tokens or window_full):
            return self._observation(), 0.0, False, False, info

        reply = self._decode_reply()
        message, reward, terminated = self.game.respond(reply)
        self._replies.append(reply)
        self._messages.append({"role": "assistant", "content": reply})
        truncated = False
        if not terminated:
            if message is None:
                raise ValueError(f"{type(self.game).__name__}.respond returned no message but the game goes on")
            self._messages.append({"role": "user", "content": message})
            answer = self._answer_tokens(message)
            out_of_turns = self.max_turns is not None and len(self._replies) >= self.max_turns
            truncated = out_of_turns or len(self._context) + len(answer) >= self.max_context_tokens
            if not truncated:
                self._context.extend(answer)
                self._reply = []
        info.update(turn=len(self._replies), reply=reply, message=None if terminated else message)
        self._return += float(reward)
        if terminated or truncated:
            self._done = True
            game_info = self.game.info()
            numbers = {k: float(v) for k, v in game_info.items()
                       if isinstance(v, (bool, int, float)) and k != "score"}
            info.update(completion="\n".join(self._replies), messages=[dict(m) for m in self._messages],
                        game_info=game_info, reward_components={"score": self._return, **numbers})
            if self.render_mode == "human":
                print(f"{self._text()}\n[return {self._return:+.3f}]", flush=True)
        return self._observation(), float(reward), bool(terminated), truncated, info

    EPISODE_STATE_KEYS = ("game", "first", "messages", "prompt_tokens", "context", "reply", "replies", "return", "done")
    """The keys of :meth:`get_episode_state`."""

    def get_episode_state(self) -> dict[str, Any]:
        """The game in progress, as a deep copy (for :func:`agents.training.resume.save_training_state`).

        :return: ``game`` (a deep copy of the :class:`DialogueGame`, whose state is the game's: a
            game must be deep-copyable, as :func:`as_game` already requires, and picklable to be
            saved to a file), ``first`` (the first message), ``messages`` (the conversation),
            ``prompt_tokens``, ``context`` and ``reply`` (``list[int]``: first turn, everything after
            it, the reply being written), ``replies`` (``list[str]``), ``return`` (``float``, the
            episode's return so far) and ``done`` (``bool``). Not included: ``self.np_random``.
        """
        return copy.deepcopy({"game": self.game, "first": self._first, "messages": self._messages,
                              "prompt_tokens": self._prompt_tokens, "context": self._context, "reply": self._reply,
                              "replies": self._replies, "return": self._return, "done": self._done})

    def set_episode_state(self, state: dict[str, Any]) -> None:
        """Continue the game ``state`` (from :meth:`get_episode_state` of an env built with the same
        arguments); the env's game is replaced by a copy of the saved one. ``self.np_random`` is not touched.

        :raises ValueError: a key is missing or unknown, or the tokens do not fit this env's windows.
        :raises TypeError: ``state["game"]`` is not a :class:`DialogueGame`.
        """
        _check_state_keys(state, self.EPISODE_STATE_KEYS, type(self).__name__)
        if not isinstance(state["game"], DialogueGame):
            raise TypeError(f"state['game'] must be a DialogueGame, got {type(state['game']).__name__}")
        if len(state["prompt_tokens"]) > self.observation_space.prompt_length or len(state["context"]) > self.max_context_tokens:
            raise ValueError(f"the episode state holds {len(state['prompt_tokens'])} first-turn and {len(state['context'])} "
                             f"context tokens, more than this env's windows ({self.observation_space.prompt_length}, "
                             f"{self.max_context_tokens}); build the env with the arguments of the env it was saved from")
        state = copy.deepcopy(state)
        self.game, self._first, self._messages = state["game"], state["first"], state["messages"]
        self._prompt_tokens, self._context, self._reply = state["prompt_tokens"], state["context"], state["reply"]
        self._replies, self._return, self._done = state["replies"], float(state["return"]), bool(state["done"])

    def _observation(self) -> dict:
        return self.observation_space.encode(self._prompt_tokens, self._context)

    def _decode_reply(self) -> str:
        tokens = self._reply[:-1] if self._reply and self._reply[-1] in self.stop_token_ids else self._reply
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _answer_tokens(self, message: str) -> list[int]:
        """Context tokens after the agent's reply: the rest of its turn's closing, the game's message
        as a user turn, and the next assistant header."""
        closing = self._closing
        if self._reply[-1] in self.stop_token_ids and self._eot_text and closing.startswith(self._eot_text):
            closing = closing[len(self._eot_text):]  # the agent already wrote the end-of-turn token
        text = closing + chat.next_turn_text(self.tokenizer, message)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def render(self) -> str | np.ndarray | None:
        """``"ansi"``: the conversation so far as the model sees it (special tokens included);
        ``"rgb_array"``: that text as a ``uint8`` frame ``(360, 640, 3)``; ``None`` otherwise
        (``"human"`` prints at each episode's end instead)."""
        if self.render_mode == "rgb_array":
            return text_frame(self._text())
        return self._text() if self.render_mode == "ansi" else None

    def _text(self) -> str:
        return self.tokenizer.decode(self._prompt_tokens + self._context)
