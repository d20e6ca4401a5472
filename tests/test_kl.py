"""KL penalty to a reference model: exact per-token arithmetic, GAE on penalised rewards, controllers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM

from agents import TransformerPolicy, text_ppo_kwargs
from agents.algorithms.kl import AdaptiveKLController, FixedKLController, KLPenaltyCallback, complete_episode_sums
from tests.conftest import TEST_SEED
from textgym.tasks.synthetic import TASKS
from textgym.tiny import save_tiny_lm

SCORE = 0.3
BETA = 0.5


def constant_reward(prompts, completions):
    return [SCORE] * len(completions)


def train_one_rollout(env_kwargs, callback, n_envs=2, n_steps=12):
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0,
                **text_ppo_kwargs(n_steps=n_steps, batch_size=8, gae_lambda=1.0, learning_rate=1e-3))
    model.learn(n_steps * n_envs, callback=callback)
    return model


def test_penalty_matches_a_direct_computation_and_gae_uses_it(tiny_env_kwargs, tmp_path):
    reference_path = save_tiny_lm(tmp_path / "reference", seed=1)  # a different model: KL is far from 0
    env_kwargs = {**tiny_env_kwargs, "reward_model": constant_reward}
    callback = KLPenaltyCallback(BETA, reference_model=str(reference_path))
    model = train_one_rollout(env_kwargs, callback)
    buffer = model.rollout_buffer  # as PPO saw it: get() flattened all but rewards and episode_starts
    n_steps, n_envs = 12, 2
    unflatten = lambda a: a.reshape(n_envs, n_steps).T  # noqa: E731  (env-major -> (n_steps, n_envs))
    rewards, starts = buffer.rewards, buffer.episode_starts
    returns, log_probs = unflatten(buffer.returns.reshape(-1)), unflatten(buffer.log_probs.reshape(-1))
    ids = buffer.observations["input_ids"].reshape(n_envs, n_steps, -1).transpose(1, 0, 2).astype(np.int64)  # stored compactly (uint8)
    mask = buffer.observations["attention_mask"].reshape(n_envs, n_steps, -1).transpose(1, 0, 2)
    actions = unflatten(buffer.actions.reshape(-1)).astype(int)
    reference = AutoModelForCausalLM.from_pretrained(reference_path).eval()
    checked, episodes_checked = 0, 0
    for env in range(n_envs):
        for t in range(n_steps - 1):
            tokens = ids[t, env][mask[t, env] == 1]
            with torch.no_grad():  # the reference alone on the unpadded text: the direct computation
                ref = torch.log_softmax(reference(torch.as_tensor(tokens)[None]).logits[0, -1], -1)[actions[t, env]]
            score = SCORE if starts[t + 1, env] else 0.0
            expected = score - BETA * (log_probs[t, env] - ref.item())
            assert rewards[t, env] == pytest.approx(expected, abs=1e-5)
            checked += 1
        # gamma = lambda = 1: the return of a step is the sum of the episode's remaining rewards.
        for t in range(n_steps - 1):
            if starts[t, env]:
                end = t + int(np.argmax(starts[t + 1:, env])) if starts[t + 1:, env].any() else None
                if end is not None:
                    np.testing.assert_allclose(returns[t, env], rewards[t:end + 1, env].sum(), rtol=0, atol=1e-5)
                    episodes_checked += 1
    assert checked == 22
    # Episodes of at most 4 tokens (max_new_tokens): each env completes at least 2 of them (starting
    # at t <= 4 and ending before the last step) whatever is sampled.
    assert episodes_checked >= 2 * n_envs
    assert callback.stats["kl/coef"] == BETA
    assert abs(callback.stats["kl/episode_kl"]) > 1e-2  # the same model gives < 1e-4 (next test)


def test_reference_equal_to_the_policy_gives_zero_kl(tiny_env_kwargs):
    callback = KLPenaltyCallback(BETA)
    train_one_rollout(tiny_env_kwargs, callback)
    logged = callback.stats
    assert abs(logged["kl/episode_kl"]) < 1e-4
    assert logged["kl/penalised_return"] == pytest.approx(logged["kl/score"], abs=1e-4)


def test_adaptive_controller_follows_ziegler_et_al():
    controller = AdaptiveKLController(init_kl_coef=0.1, target=2.0, horizon=1000)
    controller.update(kl=3.0, n_episodes=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * (1 + 0.2 * 0.1), rel=1e-12)
    controller.update(kl=2.2, n_episodes=100)  # error +0.1
    assert controller.value == pytest.approx(0.1 * 1.02 * 1.01, rel=1e-12)
    controller.update(kl=0.0, n_episodes=500)  # error clipped to -0.2
    assert controller.value == pytest.approx(0.1 * 1.02 * 1.01 * 0.9, rel=1e-12)
    fixed = FixedKLController(0.2)
    fixed.update(kl=100.0, n_episodes=100)
    assert fixed.value == 0.2
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(target=0)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(-1)


def test_adaptive_coefficient_changes_during_training(tiny_env_kwargs):
    controller = AdaptiveKLController(init_kl_coef=0.1, target=1e6, horizon=48)
    callback = KLPenaltyCallback(controller)
    # No stop token: every episode is 4 tokens, so the rollout of 12 steps x 2 envs completes exactly
    # 6 episodes, a count unlike the 24 steps, the 2 envs or the 1 rollout a wrong counter would use.
    train_one_rollout({**tiny_env_kwargs, "eos_token_id": None}, callback, n_steps=12)
    buffer = callback.model.rollout_buffer
    episodes = len(complete_episode_sums(buffer.rewards, buffer.episode_starts, callback.locals["dones"]))
    assert episodes == 6
    # KL far below the target: the clipped error is -0.2, and the controller counts episodes.
    assert callback.stats["kl/coef"] == 0.1
    assert controller.value == pytest.approx(0.1 * (1 - 0.2 * episodes / 48), rel=1e-12)


class RecordKL(BaseCallback):
    """The KL callback's episode KL after every rollout (place it after the KL callback)."""

    def __init__(self, kl: KLPenaltyCallback):
        super().__init__()
        self.kl, self.history = kl, []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.history.append(self.kl.stats["kl/episode_kl"])


@pytest.mark.learning
def test_adaptive_controller_holds_the_kl_near_its_target(record_property):
    """The keyword reward pulls the tiny LM far from its start: with a fixed beta of 0.05 the KL
    per episode reached 7.2 nats (mean of the last quarter of 8,192 steps). The controller, at
    64 episodes per rollout and a horizon of 256 (so beta moves up to 5% per rollout, as the
    default horizon of 64 allows at the main job's 16 episodes per rollout), overshoots to ~7
    nats early, then holds the target of 2: last-quarter means 1.98, 2.03, 2.09 for seeds 0-2."""
    env = make_vec_env(TASKS["keyword"].gym_id, n_envs=8, seed=TEST_SEED)
    model = PPO(TransformerPolicy, env, seed=TEST_SEED, **text_ppo_kwargs(learning_rate=1e-3, batch_size=64))
    kl = KLPenaltyCallback(AdaptiveKLController(0.05, target=2.0, horizon=256))
    record = RecordKL(kl)
    model.learn(16_384, callback=[kl, record])
    last_quarter = float(np.mean(record.history[-len(record.history) // 4:]))
    record_property("figure", last_quarter)
    assert 1.4 < last_quarter < 2.6, f"KL per episode {last_quarter:.2f} nats, target 2"
    assert max(record.history) > 4  # the reward did pull it away: holding the target was the controller's work


def test_complete_episode_sums():
    values = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]])
    starts = np.array([[0, 1], [1, 0], [0, 1], [1, 0]], dtype=np.float32)
    # env 0: [2, 3] is complete (next start at t=3); [4] ends with last_dones -> complete. t=0 is a tail.
    # env 1: [10, 20] complete; [30, 40] not finished (last_dones False).
    sums = complete_episode_sums(values, starts, last_dones=np.array([True, False]))
    np.testing.assert_array_equal(sums, [5.0, 4.0, 30.0])


def test_reference_pass_in_chunks_equals_one_pass(tiny_env_kwargs, tiny_lm):
    """Chunks of 1, 5 and 7 rows (episodes cut at chunk borders) give the log-probs of one pass.

    Without a stop token every episode is 4 rows (each env's 10 rows: 4 + 4 + 2), so chunks of 5
    and 7 cut episodes whatever is sampled: rows 4-7 at row 5, and at row 7."""
    from agents.algorithms.kl import reference_log_probs

    env = make_vec_env("TextGen-v0", n_envs=3, seed=0, env_kwargs={**tiny_env_kwargs, "eos_token_id": None})
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=10, batch_size=10))
    model.learn(30)
    buffer = model.rollout_buffer  # flattened env-major by get(): episodes are runs of rows
    ids = torch.as_tensor(buffer.observations["input_ids"].reshape(30, -1).astype(np.int64))
    mask = torch.as_tensor(buffer.observations["attention_mask"].reshape(30, -1).astype(np.int64))
    actions = torch.as_tensor(buffer.actions.reshape(-1).astype(np.int64))
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    whole = reference_log_probs(lm, ids, mask, actions, chunk_size=10_000)
    assert whole.shape == (30,) and whole.dtype == torch.float32 and bool((whole < 0).all())
    generated = mask[:, -tiny_env_kwargs["max_new_tokens"]:].sum(-1)  # the premise: 4-row episodes, then 2
    assert generated.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] * 3
    for chunk in (1, 5, 7):
        torch.testing.assert_close(reference_log_probs(lm, ids, mask, actions, chunk_size=chunk), whole,
                                   rtol=0, atol=1e-6)
