"""sb3-contrib's TRPO trains TransformerPolicy unchanged: twice-differentiable attention, grouped forwards, LoRA."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from sb3_contrib import TRPO
from stable_baselines3.common.env_util import make_vec_env

from agents import EpisodeRolloutBuffer, TransformerPolicy
from agents.policy import policy as policy_module
from tests.conftest import TEST_SEED, mean_reward
from textgym.tasks.synthetic import TASKS

KEYWORD = TASKS["keyword"]


def make_trpo(n_envs: int = 8, seed: int = 0, env_kwargs: dict | None = None, **policy_kwargs) -> TRPO:
    env = make_vec_env(KEYWORD.gym_id, n_envs=n_envs, seed=seed, env_kwargs=env_kwargs)
    return TRPO(TransformerPolicy, env, seed=seed, n_steps=32, batch_size=64, gamma=1.0, target_kl=0.05,
                learning_rate=1e-3, rollout_buffer_class=EpisodeRolloutBuffer, policy_kwargs=policy_kwargs)


@pytest.mark.learning
def test_trpo_learns_the_keyword_task(record_property):
    """Measured (seed 0): 0.083 before; 0.82 after 2,048 steps, 0.99 after 4,096 (chance 0.086)."""
    model = make_trpo(seed=TEST_SEED)
    before = mean_reward(model)
    model.learn(4096)
    after = mean_reward(model)
    record_property("figure", after)
    assert before < KEYWORD.chance + 0.1
    assert after > 0.8, f"TRPO: {before:.3f} -> {after:.3f}"


def test_fused_attention_would_break_trpos_second_derivative(monkeypatch):
    """Why the policy switches kernels: without it TRPO fails as issue 11 reports (on the CPU kernel
    of torch 2.13; a torch whose fused kernel gains a second derivative makes this test fail, and
    the switch can go)."""
    monkeypatch.setattr(policy_module, "_twice_differentiable_attention", contextlib.nullcontext)
    model = make_trpo(n_envs=2)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        model.learn(64)


def test_trpo_with_lora_moves_only_adapters_and_value_head():
    model = make_trpo(n_envs=2, lora_config=dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    policy = model.policy
    frozen = {n for n, p in policy.lm.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & {n.removeprefix("features_extractor.lm.") for n, _ in policy.named_parameters()}
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    model.learn(128)
    after = policy.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert any("lora_" in name for name in changed) and any("value_net" in name for name in changed)
    assert all("lora_" in name or "value_net" in name for name in changed)


def test_grouped_distribution_and_values_equal_per_observation():
    from agents.policy.prefix_sharing import covering_rows

    model = make_trpo(n_envs=2, env_kwargs=dict(eos_token_id=None))  # 4-token episodes, whatever is sampled
    model.learn(64)
    batch = next(model.rollout_buffer.get(batch_size=None))
    policy = model.policy
    # The premise, built: 64 rows in 16 episodes of 4, so the grouped forward really groups.
    obs = batch.observations
    assert len(torch.unique(covering_rows(obs["input_ids"], obs["attention_mask"]))) <= 16
    results = {}
    for grouped in (True, False):
        policy.share_prefix_forward = grouped
        with torch.no_grad():
            results[grouped] = (policy.get_distribution(batch.observations).distribution.logits,
                                policy.predict_values(batch.observations))
    for got, expected in zip(results[True], results[False]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert np.isfinite(results[True][0].numpy()).all()


@pytest.mark.parametrize("lora", [False, True])
def test_transformer_trpo_takes_upstreams_actor_gradients_in_one_backward_pass(lora, monkeypatch):
    """TransformerTRPO's one-call gradients equal sb3-contrib's per-parameter ones, entry for entry."""
    from agents.algorithms.trpo import TransformerTRPO

    lora_config = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    lora_kwargs = dict(lora_config=lora_config) if lora else {}
    model = TransformerTRPO(TransformerPolicy, make_vec_env(KEYWORD.gym_id, n_envs=2, seed=0), seed=0, n_steps=8,
                            batch_size=16, gamma=1.0, rollout_buffer_class=EpisodeRolloutBuffer, policy_kwargs=lora_kwargs)
    calls = []
    ours, upstream = TransformerTRPO._compute_actor_grad, TRPO._compute_actor_grad

    def both(self, kl_div, policy_objective):
        theirs = upstream(self, kl_div, policy_objective)
        calls.append((ours(self, kl_div, policy_objective), theirs))
        return theirs

    monkeypatch.setattr(TransformerTRPO, "_compute_actor_grad", both)
    model.learn(16)
    (mine, theirs), = calls
    assert len(mine[0]) == len(theirs[0]) > 3 and all(p is q for p, q in zip(mine[0], theirs[0]))
    torch.testing.assert_close(mine[1], theirs[1], rtol=0, atol=0)
    torch.testing.assert_close(mine[2], theirs[2], rtol=0, atol=0)
    assert mine[3] == theirs[3]


def test_transformer_trpo_and_trpo_read_each_others_zips(tmp_path):
    from agents.algorithms.trpo import TransformerTRPO

    model = TransformerTRPO(TransformerPolicy, make_vec_env(KEYWORD.gym_id, n_envs=2, seed=0), seed=0, n_steps=8,
                            batch_size=16, gamma=1.0, rollout_buffer_class=EpisodeRolloutBuffer)
    model.learn(16)
    model.save(tmp_path / "run.zip")
    for cls in (TRPO, TransformerTRPO):
        loaded = cls.load(tmp_path / "run.zip", device="cpu")
        assert loaded.rollout_buffer_class is EpisodeRolloutBuffer and loaded.num_timesteps == 16
        for name, tensor in model.policy.state_dict().items():
            assert torch.equal(loaded.policy.state_dict()[name], tensor), name
    TRPO("MlpPolicy", "CartPole-v1", n_steps=64, batch_size=64).save(tmp_path / "cartpole.zip")
    assert TransformerTRPO.load(tmp_path / "cartpole.zip").n_steps == 64
