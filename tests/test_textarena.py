"""TextArena-v0: TextArena's single-player games through the multi-turn dialogue env, offline."""

from __future__ import annotations

import re

import gymnasium as gym
import pytest

from textgym.tasks.textarena import SINGLE_PLAYER_GAMES, TextArenaGame
from textgym.tiny import save_tiny_lm

END = 4  # <|im_end|> of the tiny chat tokenizer


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("arena_lm"), chat=True))


def test_guess_the_number_plays_to_a_win_by_bisection():
    game = TextArenaGame("GuessTheNumber-v0")
    opening = game.reset(seed=3)
    assert "Guess The Number" in opening and "[5]" in opening
    low, high, reward, done, turns = 1, 20, 0.0, False, 0
    while not done:
        guess = (low + high) // 2
        message, reward, done = game.respond(f"My guess is [{guess}]")
        turns += 1
        if not done:
            assert message in ("The target number is higher.", "The target number is lower.")
            assert reward == 0.0
            low, high = (guess + 1, high) if message.endswith("higher.") else (low, guess - 1)
    assert reward == 1.0 and turns <= 5 and "Congratulations" in game.info()["reason"]
    assert game.reset(seed=3) == opening  # seeded: the same game again


def test_every_listed_game_starts_offline():
    for game_id in SINGLE_PLAYER_GAMES:
        assert TextArenaGame(game_id).reset(seed=0).strip(), game_id


def test_games_that_cannot_be_played_fail_with_a_reason():
    with pytest.raises(ValueError, match="not a TextArena game id.*GuessTheNumber-v0"):
        TextArenaGame("NoSuchGame-v0")
    with pytest.raises(ValueError, match="one player|several players"):
        TextArenaGame("TicTacToe-v0")


def test_textarena_env_is_a_token_level_dialogue(chat_lm):
    env = gym.make("TextArena-v0", game="GuessTheNumber-v0", model_name_or_path=chat_lm,
                   max_prompt_tokens=160, max_context_tokens=64, max_reply_tokens=4)
    obs, info = env.reset(seed=0)
    assert "Guess The Number" in info["prompt"]
    # An empty reply is an invalid move: TextArena warns once, then ends the game.
    _, reward, terminated, truncated, info = env.step(END)
    assert not (terminated or truncated) and reward == 0.0 and "invalid move" in info["message"]
    _, reward, terminated, truncated, info = env.step(END)
    assert terminated and not truncated and info["game_info"]["invalid_move"]
    assert re.search("Invalid Move", info["game_info"]["reason"])
