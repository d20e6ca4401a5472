"""TextArena's single-player games (``textarena==0.7.4``) as token-level multi-turn environments.

``gym.make("TextArena-v0", game="GuessTheNumber-v0", model_name_or_path=..., ...)`` plays a
TextArena game through :class:`textgym.dialogue.DialogueEnv`: the game's messages are user turns
of the model's chat template, the agent writes each move token by token, and TextArena's final
reward for player 0 is the reward of the last turn (0 before). TextArena itself acts on whole
replies (``env.step(reply)``); this module feeds it the decoded reply of each turn.

The game runs unwrapped (TextArena's ``-raw`` id), so each turn's user message is exactly what
the game said since the agent's last move (its rules and board at the start, then hints, boards
or errors), not TextArena's default of re-sending the whole history every turn: the token-level
observation already holds the history.

Games that work offline with one player (checked here, textarena 0.7.4): :data:`SINGLE_PLAYER_GAMES`.
Multi-player games raise ``ValueError`` (they need a second player), and games that download
data on first use (nltk corpora: Hangman, Wordle, WordLadder, ...) raise ``RuntimeError`` when
offline. Note that TextArena seeds Python's global ``random`` module at every game reset.
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Any

from textgym.dialogue import DialogueEnv, DialogueGame

SINGLE_PLAYER_GAMES = (
    "2048-v0", "Bandit-v0", "Blackjack-v0", "Countdown-v0", "Crosswords-v0", "Cryptarithm-v0",
    "FifteenPuzzle-v0", "FrozenLake-v0", "GuessTheNumber-v0", "LightsOut-v0", "LogicPuzzle-v0",
    "Mastermind-v0", "Minesweeper-v0", "PegJump-v0", "RushHour-v0", "Secretary-v0", "Set-v0",
    "Slitherlink-v0", "Sokoban-v0", "Sudoku-v0", "ThreeCardMonte-v0", "TowerOfHanoi-v0",
)
"""Base ids of the TextArena games that start offline with one player (their variants, such as
``GuessTheNumber-v0-hardcore`` or ``2048-v0-easy``, work too: 57 ids in all), found by resetting
every registered game with ``num_players=1`` without network access and keeping those whose state
is TextArena's ``SinglePlayerState``."""


def _textarena():
    try:
        import textarena
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise ImportError("TextArena games need the textarena package: pip install textarena==0.7.4") from error
    return textarena


class TextArenaGame(DialogueGame):
    """A TextArena game as a :class:`textgym.dialogue.DialogueGame` for player 0.

    :param game: a TextArena id (``"GuessTheNumber-v0"``; a ``-raw`` suffix is accepted).
    :param game_kwargs: keyword arguments of the game's constructor (e.g. ``max_turns``).
    :raises ValueError: the id is not registered (the message lists single-player games), or the
        game needs more than one player.
    :raises RuntimeError: the game could not start offline (it downloads data on first use).
    """

    def __init__(self, game: str = "GuessTheNumber-v0", **game_kwargs: Any):
        ta = _textarena()
        from textarena.envs.registration import ENV_REGISTRY

        self.game_id = game.removesuffix("-raw")
        if f"{self.game_id}-raw" not in ENV_REGISTRY:
            raise ValueError(f"{game!r} is not a TextArena game id; single-player games that run offline: "
                             f"{', '.join(SINGLE_PLAYER_GAMES)} (and their variants)")
        self.game_kwargs = game_kwargs
        self._env = ta.make(f"{self.game_id}-raw", **game_kwargs)
        self._rewards: dict[int, float] | None = None
        self._game_info: dict[str, Any] = {}
        self.reset(seed=0)  # fails now for multi-player games or missing data
        if not isinstance(self._env.state, ta.SinglePlayerState):
            raise ValueError(f"{self.game_id} is a game for several players; textgym plays single-player "
                             f"TextArena games: {', '.join(SINGLE_PLAYER_GAMES)}")

    def reset(self, seed: int | None = None) -> str:
        """New game (``env.reset(num_players=1, seed=seed)``); returns the game's opening messages."""
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # some games print while generating a board
                self._env.reset(num_players=1, seed=seed)
        except AssertionError as error:
            raise ValueError(f"{self.game_id} cannot be played by one player ({error}); textgym plays "
                             f"single-player TextArena games: {', '.join(SINGLE_PLAYER_GAMES)}") from error
        except LookupError as error:  # nltk: a corpus that is not installed and could not be downloaded
            raise RuntimeError(f"{self.game_id} needs data that TextArena downloads on first use (nltk), "
                               "which failed (offline?); install the data or choose another game") from error
        self._rewards, self._game_info = None, {}
        return self._messages()

    def _messages(self) -> str:
        """Everything the game told player 0 since its last move, one message per line."""
        player, observations = self._env.get_observation()
        return "\n".join(message for source, message, _ in observations if source != player)

    def respond(self, reply: str) -> tuple[str | None, float, bool]:
        """Play ``reply`` as player 0's move: ``(the game's messages, reward, done)``; the reward is
        TextArena's final reward for player 0 when the game ends, else 0."""
        done, _ = self._env.step(reply)
        if not done:
            return self._messages(), 0.0, False
        rewards, game_info = self._env.close()
        self._rewards, self._game_info = rewards, dict(game_info.get(0, {}))
        return None, float(rewards[0]), True

    def info(self) -> dict[str, Any]:
        """TextArena's ``game_info`` for player 0 at the end (``reason``, ``invalid_move``, ``turn_count``)
        and ``win``: whether TextArena's final reward was 1 (its reward for a won game)."""
        won = self._rewards is not None and self._rewards.get(0) == 1
        return {"game": self.game_id, **self._game_info, "win": won}


def make_textarena_env(game: str = "GuessTheNumber-v0", game_kwargs: dict[str, Any] | None = None,
                       **env_kwargs: Any) -> DialogueEnv:
    """``TextArena-v0``: a :class:`DialogueEnv` playing ``TextArenaGame(game, **game_kwargs)``.

    :param game: TextArena id, see :data:`SINGLE_PLAYER_GAMES`.
    :param game_kwargs: the game's constructor arguments.
    :param env_kwargs: :class:`textgym.dialogue.DialogueEnv` arguments (``model_name_or_path``,
        ``max_prompt_tokens``, ``max_context_tokens``, ``max_reply_tokens``, ``max_turns``, ...).
    :raises ValueError, RuntimeError: as :class:`TextArenaGame` and :class:`DialogueEnv`.
    """
    # A factory, not an instance: DialogueEnv would deep-copy an instance (a second TextArena env).
    return DialogueEnv(functools.partial(TextArenaGame, game, **(game_kwargs or {})), **env_kwargs)
