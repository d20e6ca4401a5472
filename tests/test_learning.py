"""Upstream SB3 PPO trains a tiny random GPT-2 on a synthetic text task (say the keyword)."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from agents import TransformerPolicy, text_ppo_kwargs
from tests.conftest import TEST_SEED

CHANCE_CEILING = 0.3
"""An untrained policy says "good" about once in 19 tokens and often stops early: mean reward ~0.05."""

THRESHOLD = 0.8
"""After training, the keyword must fill at least 80% of the 4 slots (optimum: 1.0; seeds 0-3 gave 0.99-1.0)."""


@pytest.mark.learning
def test_ppo_learns_to_say_the_keyword(tiny_env_kwargs, record_property):
    env = make_vec_env("TextGen-v0", n_envs=4, seed=TEST_SEED, env_kwargs=tiny_env_kwargs)
    eval_env = make_vec_env("TextGen-v0", n_envs=4, seed=TEST_SEED + 123, env_kwargs=tiny_env_kwargs)
    model = PPO(TransformerPolicy, env, seed=TEST_SEED,
                **text_ppo_kwargs(learning_rate=3e-3, n_steps=32, batch_size=32, n_epochs=4))
    before, _ = evaluate_policy(model, eval_env, n_eval_episodes=40, deterministic=False)
    model.learn(total_timesteps=3_000)
    after, _ = evaluate_policy(model, eval_env, n_eval_episodes=40, deterministic=False)
    record_property("figure", after)
    assert before < CHANCE_CEILING
    assert after >= THRESHOLD, f"mean reward {after:.2f} after training (before {before:.2f})"
    assert np.isfinite(model.logger.name_to_value["train/approx_kl"])
