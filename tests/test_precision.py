"""bfloat16 policies: the LM in low precision, everything PPO compares in float32, master weights that keep small updates."""

from __future__ import annotations

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from agents import TransformerPolicy, text_ppo_kwargs
from agents.policy.precision import MasterWeights
from tests.conftest import TEST_SEED
from textgym.tasks.synthetic import TASKS


def test_master_weights_keep_updates_that_bfloat16_rounds_away():
    torch.manual_seed(0)
    weights = torch.full((64,), 0.5)
    pure, mixed = (torch.nn.Parameter(weights.to(torch.bfloat16)) for _ in range(2))
    plain = torch.optim.Adam([pure], lr=1e-4)
    masters = MasterWeights([mixed])
    optimizer = torch.optim.Adam(masters.masters, lr=1e-4)
    masters.attach(optimizer)
    for _ in range(50):
        for param, opt in ((pure, plain), (mixed, optimizer)):
            opt.zero_grad()
            param.grad = None
            (param.float() * -1.0).sum().backward()  # constant gradient: Adam moves each weight by lr per step
            opt.step()
    # bfloat16 spacing at 0.5 is 2**-8 ~ 0.004: a 1e-4 step never reaches the next representable value.
    assert torch.equal(pure.detach(), weights.to(torch.bfloat16))
    torch.testing.assert_close(masters.masters[0].detach(), weights + 50 * 1e-4, rtol=0, atol=1e-5)
    assert float(mixed.detach().float().mean()) > 0.5  # the rounded copy followed (0.5 + 0.005 -> 0.50390625)
    assert mixed.grad is None and masters.low_precision == 1


def make_model(dtype_kwargs: dict, n_envs: int = 4, seed: int = 0, **ppo) -> PPO:
    task = TASKS["keyword"]
    env = make_vec_env(task.gym_id, n_envs=n_envs, seed=seed)
    return PPO(TransformerPolicy, env, seed=seed, **text_ppo_kwargs(**{**task.ppo_kwargs, **ppo, "policy_kwargs": dtype_kwargs}))


@pytest.mark.parametrize("dtype_kwargs", [dict(dtype=torch.bfloat16),
                                          dict(from_pretrained_kwargs=dict(dtype=torch.bfloat16)),
                                          dict(dtype="bfloat16")])
def test_bfloat16_lm_with_float32_value_head_and_log_probs(dtype_kwargs):
    model = make_model(dtype_kwargs)
    policy = model.policy
    assert {p.dtype for p in policy.lm.parameters()} == {torch.bfloat16}
    assert policy.value_net.weight.dtype == torch.float32
    assert policy.master_weights.low_precision == len(list(policy.lm.parameters()))
    obs = {k: torch.as_tensor(v) for k, v in model.env.reset().items()}
    with torch.no_grad():
        actions, values, log_prob = policy(obs)
        _, evaluated, entropy = policy.evaluate_actions(obs, actions)
    assert values.dtype == log_prob.dtype == evaluated.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(evaluated, log_prob, rtol=0, atol=1e-5)  # cached rollout = full forward
    # The LM's own bfloat16 forward on the unpadded prompt gives the same distribution.
    row = obs["input_ids"][0][obs["attention_mask"][0].bool()]
    with torch.no_grad():
        expected = torch.log_softmax(policy.lm(row[None]).logits[0, -1].float(), -1)[actions[0]]
    assert abs(float(expected) - float(log_prob[0])) < 1e-3


def test_bad_dtype_fails_at_construction():
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        make_model(dict(dtype="int8"))


@pytest.mark.learning
def test_bfloat16_ppo_learns_the_keyword_task(record_property):
    """Measured: 0.08 before; after 6,000 steps float32 and bfloat16 both reach ~1.0 (tiny LM, seed 0)."""
    model = make_model(dict(dtype=torch.bfloat16), n_envs=8, seed=TEST_SEED)
    env = model.env

    def mean_reward(n_steps: int = 64) -> float:
        obs, total, episodes = env.reset(), 0.0, 0
        for _ in range(n_steps):
            action, _ = model.predict(obs)
            obs, reward, done, _ = env.step(action)
            total, episodes = total + float(reward[done].sum()), episodes + int(done.sum())
        return total / max(episodes, 1)

    before = mean_reward()
    weight = model.policy.lm.get_input_embeddings().weight.detach().clone()
    model.learn(TASKS["keyword"].total_timesteps)
    after = mean_reward()
    record_property("figure", after)
    assert not torch.equal(weight, model.policy.lm.get_input_embeddings().weight)
    assert before < 0.3 and after > 0.8, f"{before:.3f} -> {after:.3f}"
