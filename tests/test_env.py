"""TextGen-v0's Gymnasium contract, on the tiny word-level LM (ids: <pad> 0, <unk> 1, <eos> 2, good 3, ...)."""

from __future__ import annotations

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.env_util import make_vec_env

from tests.conftest import KEYWORD, PROMPTS
from textgym.rendering import text_frame

EOS, GOOD, BAD = 2, 3, 4


def test_both_env_checkers_pass_without_warnings(make_tiny_env):
    env = make_tiny_env(render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gym_check_env(env.unwrapped)
        sb3_check_env(env.unwrapped, warn=True)


def test_spaces_and_observation_layout(make_tiny_env):
    env = make_tiny_env()
    assert env.action_space == gym.spaces.Discrete(19)
    obs, info = env.reset(options={"prompt": "a film is"})
    tokenizer = env.unwrapped.tokenizer
    prompt_ids = tokenizer("a film is")["input_ids"]
    assert obs["input_ids"].dtype == np.int64 and obs["attention_mask"].dtype == np.int8
    np.testing.assert_array_equal(obs["input_ids"], [0, 0, *prompt_ids, 0, 0, 0, 0])
    np.testing.assert_array_equal(obs["attention_mask"], [0, 0, 1, 1, 1, 0, 0, 0, 0])
    obs, *_ = env.step(GOOD)
    np.testing.assert_array_equal(obs["input_ids"], [0, 0, *prompt_ids, GOOD, 0, 0, 0])
    np.testing.assert_array_equal(obs["attention_mask"], [0, 0, 1, 1, 1, 1, 0, 0, 0])
    assert info == {"prompt": "a film is"}
    assert env.observation_space.contains(obs)


def test_seeded_resets_draw_the_same_prompts(make_tiny_env):
    def prompts(seed):
        env = make_tiny_env()
        first = env.reset(seed=seed)[1]["prompt"]
        return [first] + [env.reset()[1]["prompt"] for _ in range(11)]

    assert prompts(3) == prompts(3)
    assert prompts(3) != prompts(4)
    assert set(prompts(3)) <= set(PROMPTS)


def test_terminates_at_eos_with_reward_only_at_the_end(make_tiny_env):
    env = make_tiny_env()
    env.reset(seed=0, options={"prompt": "the movie was"})
    steps = [env.step(a) for a in (GOOD, BAD, EOS)]
    assert [s[1] for s in steps[:2]] == [0.0, 0.0]
    assert [(s[2], s[3]) for s in steps] == [(False, False), (False, False), (True, False)]
    _, reward, _, _, info = steps[-1]
    assert info["completion"] == " good bad"
    assert reward == pytest.approx(1 / 4)  # one keyword / MAX_NEW_TOKENS
    assert info["reward_components"] == {"score": reward}
    with pytest.raises(RuntimeError, match="reset"):
        env.step(GOOD)


def test_terminates_not_truncates_at_max_new_tokens(make_tiny_env):
    env = make_tiny_env(max_new_tokens=3, render_mode="ansi")
    env.reset(options={"prompt": "one two"})
    results = [env.step(GOOD) for _ in range(3)]
    assert [r[2] for r in results] == [False, False, True]
    assert not any(r[3] for r in results)
    assert results[-1][1] == 3 / 4
    assert env.render() == "one two good good good"


def test_human_render_mode_prints_each_finished_episode(make_tiny_env, capsys):
    env = make_tiny_env(max_new_tokens=2, render_mode="human")
    env.reset(options={"prompt": "one two"})
    env.step(GOOD)
    assert capsys.readouterr().out == "" and env.render() is None
    env.step(GOOD)
    assert capsys.readouterr().out == "one two good good  [reward +0.500]\n"


def test_rgb_array_frames_draw_the_text_and_make_vec_env_warns_nothing(tiny_env_kwargs):
    # SB3's make_vec_env asks every env for render_mode="rgb_array"; Gymnasium warns if the env lacks it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vec_env = make_vec_env("TextGen-v0", n_envs=1, seed=0, env_kwargs=tiny_env_kwargs)
    env = vec_env.envs[0].unwrapped
    assert env.render_mode == "rgb_array"
    env.reset(options={"prompt": "one two"})
    before = env.render()
    env.step(GOOD)
    after = env.render()
    assert before.shape == after.shape == (360, 640, 3) and before.dtype == np.uint8
    assert (before < 128).any() and (before != after).any()  # text drawn; the new token changed the frame
    blank = text_frame("")
    assert (blank == 255).all() and not np.array_equal(text_frame("one two"), text_frame("two one"))
    with pytest.raises(ValueError, match="positive"):
        text_frame("x", height=0)


def test_works_in_sb3_vec_env(tiny_env_kwargs):
    vec_env = make_vec_env("TextGen-v0", n_envs=3, seed=1, env_kwargs=tiny_env_kwargs)
    obs = vec_env.reset()
    assert obs["input_ids"].shape == (3, 9) and obs["input_ids"].dtype == np.int64
    finished = []
    for _ in range(4):
        obs, rewards, dones, infos = vec_env.step(np.array([GOOD, EOS, BAD]))
        finished += [(r, info["completion"]) for r, d, info in zip(rewards, dones, infos) if d]
    assert (1.0, " good good good good") in finished and (0.0, "") in finished


def test_dataset_like_prompt_source(make_tiny_env):
    class FakeDataset:  # the part of datasets.Dataset the env uses
        column_names = ["text", "label"]

        def __getitem__(self, column):
            return {"text": ["the film was", "one two"], "label": [0, 1]}[column]

    env = make_tiny_env(prompts=FakeDataset(), prompt_column="text")
    assert env.unwrapped.prompts == ["the film was", "one two"]
    with pytest.raises(ValueError, match="prompt_column"):
        make_tiny_env(prompts=FakeDataset())
    generator_env = make_tiny_env(prompts=(p for p in ["one", "two"]))
    assert generator_env.unwrapped.prompts == ["one", "two"]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"prompts": []}, ValueError, "empty"),
        ({"prompts": ["the movie was", ""]}, ValueError, "non-empty string"),
        ({"prompts": "the movie was"}, ValueError, "single string"),
        ({"prompts": ["good " * 6]}, ValueError, "max_prompt_tokens"),
        ({"reward_model": lambda p, c: [1.0, 2.0]}, ValueError, "one float per completion"),
        ({"reward_model": lambda p, c: [math.nan]}, ValueError, "non-finite"),
        ({"reward_model": 3}, TypeError, "callable"),
        pytest.param({"render_mode": "video"}, TypeError, "render_mode",  # gym.make warns first, as it should
                     marks=pytest.mark.filterwarnings("ignore:.*not in the possible render_modes")),
    ],
)
def test_bad_construction_fails_early_and_clearly(make_tiny_env, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_tiny_env(**kwargs)


def test_bad_reward_during_episode_is_reported(make_tiny_env):
    calls = []

    def flaky(prompts, completions):
        calls.append(completions)
        return [0.0] if len(calls) == 1 else [float("inf")]

    env = make_tiny_env(reward_model=flaky)
    env.reset()
    with pytest.raises(ValueError, match="non-finite"):
        env.step(EOS)


@pytest.mark.parametrize("action", [-1, 19, 2.5])
def test_out_of_range_action_is_rejected(make_tiny_env, action):
    env = make_tiny_env()
    env.reset()
    with pytest.raises(ValueError, match="not a token id"):
        env.step(action)


def test_reset_prompt_option_is_validated(make_tiny_env):
    env = make_tiny_env()
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        env.reset(options={"prompt": " ".join([KEYWORD] * 6)})
