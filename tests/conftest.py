"""Shared fixtures: a tiny random GPT-2 with a word-level tokenizer, and envs built on it; the suite's
seed and thread count."""

from __future__ import annotations

import os

import gymnasium as gym
import pytest
import torch

import textgym  # noqa: F401  (registers TextGen-v0)
from textgym.tasks.synthetic import KeywordReward
from textgym.tiny import save_tiny_lm

TEST_THREADS = 1
"""Torch threads for the whole suite. A 32-wide GPT-2 has nothing to split between threads, and
when another process keeps the second core busy, a second OpenMP thread waits for it: 1,024 PPO
steps took 0.96 s with one thread and 39-68 s with two on the 2-core development machine. One
thread also fixes the order of every float reduction, so a seed gives the same run whatever the
machine's core count. Tests of the real assets take more (``real_asset_threads`` there)."""

torch.set_num_threads(TEST_THREADS)


def _test_seed() -> int:
    value = os.environ.get("TEXTGYM_TEST_SEED", "0")
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"TEXTGYM_TEST_SEED must be an integer, got {value!r}; unset it for the default 0") from None


TEST_SEED = _test_seed()
"""Base seed of every test marked ``learning`` (``TEXTGYM_TEST_SEED``, default 0); each test adds
its own offsets. ``benchmarks/seed_sweep.py`` runs those tests over many values of it: a learning
test must pass for any of them."""


RETRY_OFFSETS = (0, 1_000, 2_000)
"""Seed offsets of the independently seeded runs a learning test may make when one run learns on
fewer than ~15 of 16 seeds (:func:`seeded_runs`)."""


def seeded_runs(run, passed) -> list:
    """``run(TEST_SEED + offset)`` for each of :data:`RETRY_OFFSETS`, stopping after the first result for
    which ``passed(result)`` holds; returns every result, in order (the first is the one a seed sweep
    records, the last the one the test asserts on)."""
    results = []
    for offset in RETRY_OFFSETS:
        results.append(run(TEST_SEED + offset))
        if passed(results[-1]):
            break
    return results

PROMPTS = ["the movie was", "a film is", "one two", "the film was very"]
KEYWORD = "good"
MAX_NEW_TOKENS = 4


keyword_reward = KeywordReward(slots=MAX_NEW_TOKENS, keyword=KEYWORD)
"""Occurrences of KEYWORD in the completion over MAX_NEW_TOKENS: 1.0 is the optimum, stopping early costs."""


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny_lm")))


@pytest.fixture
def tiny_env_kwargs(tiny_lm) -> dict:
    """TextGen-v0 arguments for the tiny LM: 4 short prompts, keyword reward, 5 + 4 token window."""
    return {"model_name_or_path": tiny_lm, "prompts": PROMPTS, "reward_model": keyword_reward,
            "max_prompt_tokens": 5, "max_new_tokens": MAX_NEW_TOKENS}


@pytest.fixture
def make_tiny_env(tiny_env_kwargs):
    """Factory for TextGen-v0 on the tiny LM; keyword arguments override :func:`tiny_env_kwargs`."""
    return lambda **kwargs: gym.make("TextGen-v0", **{**tiny_env_kwargs, **kwargs})


def mean_reward(model, n_steps: int = 64) -> float:
    """Mean return of the episodes that end within ``n_steps`` steps of ``model.predict`` on ``model.env``
    (reset first); 0 if none ends."""
    env, total, episodes = model.env, 0.0, 0
    obs = env.reset()
    for _ in range(n_steps):
        action, _ = model.predict(obs)
        obs, reward, done, _ = env.step(action)
        total, episodes = total + float(reward[done].sum()), episodes + int(done.sum())
    return total / max(episodes, 1)
