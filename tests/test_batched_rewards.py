"""BatchedRewards: one reward-model call per step for all episodes ending in it, same rewards as per-env scoring."""

from __future__ import annotations

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import SubprocVecEnv

from agents import TransformerPolicy, text_ppo_kwargs
from tests.conftest import keyword_reward
from textgym.vec_env import BatchedRewards


class CountingReward:
    """The conftest keyword reward with components, recording the size of every call."""

    def __init__(self):
        self.batch_sizes: list[int] = []

    def __call__(self, prompts, completions):
        self.batch_sizes.append(len(completions))
        score = np.asarray(keyword_reward(prompts, completions), dtype=float)
        return {"score": score, "length": [float(len(c.split())) for c in completions]}


def rollout(venv, n_steps: int, seed: int = 0):
    """Rewards, dones and final infos of ``n_steps`` random steps (actions from a fixed RNG)."""
    rng = np.random.default_rng(seed)
    venv.seed(seed)
    venv.reset()
    rewards, dones, finals = [], [], []
    for _ in range(n_steps):
        _, reward, done, infos = venv.step(rng.integers(0, venv.action_space.n, venv.num_envs))
        rewards.append(reward)
        dones.append(done)
        finals += [(i, info["completion"], info["reward_components"], info["episode"]["r"])
                   for i, info in enumerate(infos) if done[i]]
    return np.array(rewards), np.array(dones), finals


def make_envs(tiny_env_kwargs, reward, n_envs=4):
    return make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs={**tiny_env_kwargs, "reward_model": reward})


def test_batched_scoring_gives_the_same_rewards_in_fewer_calls(tiny_env_kwargs):
    per_env, batched = CountingReward(), CountingReward()
    plain = rollout(make_envs(tiny_env_kwargs, per_env), 40)
    wrapped_env = BatchedRewards(make_envs(tiny_env_kwargs, batched))
    wrapped = rollout(wrapped_env, 40)

    np.testing.assert_array_equal(wrapped[0], plain[0])
    np.testing.assert_array_equal(wrapped[1], plain[1])
    assert wrapped[2] == plain[2]  # completions, every component, and Monitor's episode returns
    construction_calls = 4  # each env scores one empty completion when built
    ends_per_step = plain[1].sum(axis=1)
    assert per_env.batch_sizes[construction_calls:] == [1] * int(ends_per_step.sum())
    assert batched.batch_sizes[construction_calls:] == [int(n) for n in ends_per_step if n]
    assert wrapped_env.reward_calls == int((ends_per_step > 0).sum()) < int(ends_per_step.sum())


def test_ppo_trains_the_same_with_batched_scoring(tiny_env_kwargs):
    """No stop token: both envs end their 4-token episodes in the same steps, so the batched run
    really scores two completions per call (asserted), whatever is sampled."""
    results, rewards = [], []
    for wrap in (False, True):
        rewards.append(CountingReward())
        venv = make_envs({**tiny_env_kwargs, "eos_token_id": None}, rewards[-1], n_envs=2)
        model = PPO(TransformerPolicy, BatchedRewards(venv) if wrap else venv, seed=0,
                    **text_ppo_kwargs(n_steps=16, batch_size=16, learning_rate=1e-3))
        model.learn(64)
        results.append(([e["r"] for e in model.ep_info_buffer], model.policy.value_net.weight.detach().clone()))
    construction_calls = 2
    assert rewards[0].batch_sizes[construction_calls:] == [1] * 16 and rewards[1].batch_sizes[construction_calls:] == [2] * 8
    assert results[0][0] == results[1][0] and len(results[0][0]) == 16
    assert np.array_equal(results[0][1].numpy(), results[1][1].numpy())


def test_provide_score_must_match_the_finishing_step(make_tiny_env):
    env = make_tiny_env().unwrapped
    env.reset(seed=0)
    env.provide_score({"score": 1.0})
    not_final = next(t for t in range(env.action_space.n) if env.text_to_score(t) is None)
    with pytest.raises(RuntimeError, match="text_to_score"):
        env.step(not_final)
    with pytest.raises(ValueError, match="score"):
        env.provide_score({"length": 1.0})


def test_batched_rewards_refuses_what_it_cannot_batch(tiny_env_kwargs):
    subprocess_envs = make_vec_env("TextGen-v0", n_envs=2, env_kwargs=tiny_env_kwargs, vec_env_cls=SubprocVecEnv)
    try:
        with pytest.raises(ValueError, match="DummyVecEnv"):
            BatchedRewards(subprocess_envs)
    finally:
        subprocess_envs.close()
