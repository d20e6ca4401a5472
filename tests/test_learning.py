"""Upstream SB3 PPO trains a tiny random GPT-2 on a synthetic text task (say the keyword)."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from agents import TransformerPolicy, text_ppo_kwargs
from tests.conftest import seeded_runs

CHANCE_CEILING = 0.3
"""An untrained policy says "good" about once in 19 tokens and often stops early: mean reward ~0.05."""

THRESHOLD = 0.8
"""After training, the keyword must fill at least 80% of the 4 slots (optimum: 1.0)."""


def train_and_evaluate(env_kwargs: dict, seed: int) -> tuple[float, float, PPO]:
    """Mean reward of 40 sampled held-out episodes before and after 3,000 steps of PPO from ``seed``."""
    env = make_vec_env("TextGen-v0", n_envs=4, seed=seed, env_kwargs=env_kwargs)
    eval_env = make_vec_env("TextGen-v0", n_envs=4, seed=seed + 123, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=seed,
                **text_ppo_kwargs(learning_rate=3e-3, n_steps=32, batch_size=32, n_epochs=4))
    before, _ = evaluate_policy(model, eval_env, n_eval_episodes=40, deterministic=False)
    model.learn(total_timesteps=3_000)
    after, _ = evaluate_policy(model, eval_env, n_eval_episodes=40, deterministic=False)
    return float(before), float(after), model


@pytest.mark.learning
def test_ppo_learns_to_say_the_keyword(tiny_env_kwargs, record_property):
    """One seeded run reaches the threshold on 53 of 56 seeds (0-15 and 780-819: median 1.0, the
    failures 0.31-0.65, seeds 786, 805 and 815), so up to three independently seeded runs are made
    and one must pass: failure odds about (3/56)**3 = 1.5e-4 per CI run, at one run's cost 19 times
    in 20. The figure is the first run's."""
    runs = seeded_runs(lambda seed: train_and_evaluate(tiny_env_kwargs, seed), lambda run: run[1] >= THRESHOLD)
    record_property("figure", runs[0][1])
    record_property("runs", len(runs))
    before, after, model = runs[-1]
    assert before < CHANCE_CEILING
    assert after >= THRESHOLD, f"mean rewards {[round(r[1], 3) for r in runs]} after training (before {before:.2f})"
    assert np.isfinite(model.logger.name_to_value["train/approx_kl"])
