"""KV-cached rollouts: exact against the uncached policy, invalidated on weight changes, bounded, contained."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ActorCriticPolicy

from agents import TransformerPolicy, text_ppo_kwargs
from agents.policy import kv_cache as kv_cache_module
from agents.policy.kv_cache import RolloutKVCache, appended_tokens, right_align

EOS = 2  # the tiny tokenizer's <eos>


def test_appended_tokens_and_right_align():
    prev_ids = torch.tensor([[0, 5, 6, 0], [0, 5, 6, 0], [0, 5, 6, 0], [0, 5, 6, 0], [0, 5, 6, 0]])
    prev_mask = torch.tensor([[0, 1, 1, 0]] * 5)
    ids = torch.tensor([[0, 5, 6, 7], [0, 5, 6, 0], [0, 5, 9, 7], [5, 6, 7, 0], [0, 5, 6, 8]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]])
    # appended / unchanged / prefix changed / shifted start / appended another token
    assert appended_tokens(prev_ids, prev_mask, ids, mask).tolist() == [1, 0, 0, 0, 1]

    aligned_ids, aligned_mask = right_align(torch.tensor([[0, 5, 6, 0], [7, 8, 9, 0], [0, 0, 0, 4]]),
                                            torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 1]]))
    assert aligned_ids.tolist() == [[0, 5, 6], [7, 8, 9], [0, 0, 4]]
    assert aligned_mask.tolist() == [[0, 1, 1], [1, 1, 1], [0, 0, 1]]


STAGGERED = (1, 2, 3, 5, 7)
"""Episode lengths for :func:`random_walk`: env ``i``'s episodes stop at ``STAGGERED[i]`` tokens (EOS
or, past ``max_new_tokens``, truncation), so episodes end at different steps by construction."""


def random_walk(env, steps: int, seed: int = 0, lengths: tuple[int, ...] | None = None):
    """Observations of ``env`` under scripted actions: non-stop tokens drawn by a seeded numpy
    generator, and with ``lengths`` env ``i`` writes EOS as the ``lengths[i]``-th token of each of its
    episodes (a length above the env's ``max_new_tokens``: the episode is truncated there). Without
    ``lengths`` no EOS: every episode runs to ``max_new_tokens``."""
    rng = np.random.default_rng(seed)
    obs = env.reset()
    position = np.zeros(env.num_envs, dtype=int)  # tokens generated in each env's episode
    for _ in range(steps):
        yield {k: torch.as_tensor(v) for k, v in obs.items()}
        actions = rng.integers(3, env.action_space.n, size=env.num_envs)
        position += 1
        if lengths is not None:
            actions[position == np.asarray(lengths[:env.num_envs])] = EOS
        obs, _, dones, _ = env.step(actions)
        position[dones] = 0


def mixed_steps(walk) -> int:
    """Steps of ``walk`` (after the first) where some rows took one token and others did not:
    the cache's two paths, one-token steps and re-encoded rows, in one call."""
    count, previous = 0, None
    for obs in walk:
        if previous is not None:
            continuing = appended_tokens(previous["input_ids"], previous["attention_mask"],
                                         obs["input_ids"], obs["attention_mask"]) == 1
            count += bool(continuing.any() and not continuing.all())
        previous = obs
    return count


def make_ppo(env_kwargs, n_envs=3, **kwargs):
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    return PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(**{"n_steps": 8, "batch_size": 8, **kwargs}))


def test_cached_features_equal_a_full_forward_across_staggered_episodes(tiny_env_kwargs):
    model = make_ppo({**tiny_env_kwargs, "max_new_tokens": 6}, n_envs=4)
    policy, cache = model.policy, model.policy.rollout_cache
    policy.set_training_mode(False)
    walk = list(random_walk(model.env, steps=60, lengths=STAGGERED))  # episodes of 1, 2, 3 and 5 tokens
    for obs in walk:
        with torch.no_grad():
            torch.testing.assert_close(cache.features(obs["input_ids"], obs["attention_mask"]),
                                       policy.extract_features(obs), rtol=0, atol=1e-5)
    # Of the 59 steps after the first, all are mixed but one: env 0 re-encodes every step (so rows
    # never all continue), and all four restart together only every lcm(1, 2, 3, 5) = 30 steps.
    assert mixed_steps(walk) == 58


def test_identical_new_rows_are_encoded_once(tiny_env_kwargs, monkeypatch):
    """Envs that start the same observation together (an RLOO/GRPO group) share one encoding; their
    next one-token steps from the copied cache equal a full forward."""
    model = make_ppo({**tiny_env_kwargs, "prompts": ["the film was very", "one two"]}, n_envs=4)
    policy, cache = model.policy, model.policy.rollout_cache
    policy.set_training_mode(False)
    space, tokenizer = model.observation_space, model.env.envs[0].unwrapped.tokenizer
    prompts = ["one two", "the film was very", "one two", "one two"]
    first = [space.encode(tokenizer(p)["input_ids"], []) for p in prompts]
    second = [space.encode(tokenizer(p)["input_ids"], [5 + i]) for i, p in enumerate(prompts)]
    encoded_rows = []
    original = RolloutKVCache._run
    monkeypatch.setattr(RolloutKVCache, "_run", lambda self, ids, *rest: encoded_rows.append(len(ids)) or original(self, ids, *rest))
    for observations in (first, second):
        obs = {k: torch.as_tensor(np.stack([o[k] for o in observations])) for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            torch.testing.assert_close(cache.features(obs["input_ids"], obs["attention_mask"]),
                                       policy.extract_features(obs), rtol=0, atol=1e-5)
    assert encoded_rows == [2, 4]  # two distinct prompts encoded, then one step of all four rows


def test_kept_rows_continue_incrementally_and_exactly(tiny_env_kwargs, monkeypatch):
    """After ``keep_rows``, the kept rows (reordered) take one-token steps that equal a full forward."""
    model = make_ppo({**tiny_env_kwargs, "max_new_tokens": 6}, n_envs=4)
    policy, cache = model.policy, model.policy.rollout_cache
    policy.set_training_mode(False)
    # Every row continues (no EOS, 6 tokens allowed); from the second step on, rows with the same prompt differ.
    walk = list(random_walk(model.env, steps=4))
    assert len({tuple(row.tolist()) for row in walk[2]["input_ids"]}) == 4  # the premise: reordering shows
    with torch.no_grad():
        cache.features(walk[1]["input_ids"], walk[1]["attention_mask"])
    encoded = []
    real_encode = RolloutKVCache._encode
    monkeypatch.setattr(RolloutKVCache, "_encode", lambda self, rows, *a: encoded.append(len(rows)) or
                        real_encode(self, rows, *a))
    # Envs 3, 0, 2 of the four continue; then env 3 alone (row 0 of those three).
    for kept, envs, obs in ((torch.tensor([3, 0, 2]), torch.tensor([3, 0, 2]), walk[2]),
                            (torch.tensor([0]), torch.tensor([3]), walk[3])):
        cache.keep_rows(kept)
        obs = {k: v[envs] for k, v in obs.items()}
        with torch.no_grad():
            torch.testing.assert_close(cache.features(obs["input_ids"], obs["attention_mask"]),
                                       policy.extract_features(obs), rtol=0, atol=1e-5)
    assert encoded == [] and cache.width == int(walk[3]["attention_mask"][3].sum())
    cache.keep_rows(torch.tensor([], dtype=torch.long))
    with torch.no_grad():
        cache.features(walk[3]["input_ids"], walk[3]["attention_mask"])
    assert encoded == [4]  # an emptied cache re-encodes the next batch, in one call


class RolloutCheck(BaseCallback):
    """After every rollout, recompute the stored values and log-probs without the cache.

    :param weights: picks one weight tensor of the policy, recorded after each rollout.
    """

    def __init__(self, weights=lambda policy: policy.lm.transformer.h[0].attn.c_attn.weight):
        super().__init__()
        self.max_errors: list[float] = []
        self.weights: list[torch.Tensor] = []
        self.watched = weights

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer, policy = self.model.rollout_buffer, self.model.policy
        n = buffer.buffer_size * buffer.n_envs
        obs = {k: torch.as_tensor(v.reshape(n, -1).astype(np.int64)) for k, v in buffer.observations.items()}
        actions = torch.as_tensor(buffer.actions.reshape(n).astype(np.int64))
        with torch.no_grad():
            values, log_prob, _ = policy.evaluate_actions(obs, actions)
        error = max((values.flatten() - torch.as_tensor(buffer.values.reshape(n))).abs().max().item(),
                    (log_prob - torch.as_tensor(buffer.log_probs.reshape(n))).abs().max().item())
        self.max_errors.append(error)
        self.weights.append(self.watched(policy).detach().clone())


def rollout_errors(env_kwargs) -> RolloutCheck:
    model = make_ppo({**env_kwargs, "max_new_tokens": 5}, learning_rate=1e-3, n_steps=7, batch_size=7)
    check = RolloutCheck()
    model.learn(4 * 7 * 3, callback=check)  # 4 rollouts, 3 updates in between; episodes cross rollouts
    return check


def test_rollouts_store_the_uncached_values_and_log_probs_over_several_updates(tiny_env_kwargs):
    check = rollout_errors(tiny_env_kwargs)
    assert len(check.max_errors) == 4
    assert max(check.max_errors) < 1e-5
    assert not torch.equal(check.weights[0], check.weights[-1])  # the updates did change the weights


@pytest.mark.parametrize("sabotage", ["stale_after_update", "position_off_by_one"])
def test_the_exactness_check_catches_a_broken_cache(tiny_env_kwargs, monkeypatch, sabotage):
    if sabotage == "stale_after_update":
        # Neither invalidation: no weight-version check, no drop when PPO switches to training.
        monkeypatch.setattr(kv_cache_module, "weights_version", lambda parameters: 0)
        monkeypatch.setattr(TransformerPolicy, "set_training_mode", ActorCriticPolicy.set_training_mode)
    else:
        real_step = RolloutKVCache._step

        def shifted(self, rows, ids, mask, k):
            self.mask = torch.cat([self.mask[:, :1], self.mask], dim=-1)  # one phantom real token
            self.layers = [(torch.cat([k[..., :1, :], k], -2), torch.cat([v[..., :1, :], v], -2)) for k, v in self.layers]
            return real_step(self, rows, ids, mask, k)

        monkeypatch.setattr(RolloutKVCache, "_step", shifted)
    assert max(rollout_errors(tiny_env_kwargs).max_errors) > 1e-4


def test_cache_serves_only_rollout_forwards(tiny_env_kwargs):
    model = make_ppo(tiny_env_kwargs, n_envs=2)
    policy = model.policy
    policy.set_training_mode(False)
    walk = random_walk(model.env, steps=3)
    first, second = next(walk), next(walk)
    with torch.no_grad():
        policy(first)
        expected_values = policy.predict_values(second)
        expected_log_prob = policy.evaluate_actions(second, torch.tensor([3, 4]))[1]
    cache = policy.rollout_cache
    cache.layers = [(torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))) for k, v in cache.layers]
    with torch.no_grad():
        torch.testing.assert_close(policy.predict_values(second), expected_values, rtol=0, atol=0)
        torch.testing.assert_close(policy.evaluate_actions(second, torch.tensor([3, 4]))[1], expected_log_prob,
                                   rtol=0, atol=0)
    assert torch.isfinite(policy(second)[2]).all()  # with grad enabled: a full forward
    with torch.no_grad(), pytest.raises(ValueError, match="invalid values"):
        policy(second)  # the poisoned cache is really what a rollout step reads: NaN logits
    actions, _ = policy.predict({k: v.numpy() for k, v in next(walk).items()})  # SB3's predict: no cache
    assert ((0 <= actions) & (actions < model.action_space.n)).all() and cache.layers is None


def test_cache_is_dropped_on_mode_switch_and_weight_change(tiny_env_kwargs, monkeypatch):
    model = make_ppo(tiny_env_kwargs, n_envs=2)
    policy, cache = model.policy, model.policy.rollout_cache
    policy.set_training_mode(False)
    encoded = []
    real_encode = RolloutKVCache._encode
    monkeypatch.setattr(RolloutKVCache, "_encode", lambda self, rows, *a: encoded.append(len(rows)) or real_encode(self, rows, *a))
    walk = random_walk(model.env, steps=4)
    with torch.no_grad():
        policy(next(walk))
        policy(next(walk))
        assert encoded == [2]  # the second step continued both rows
        with torch.no_grad():
            policy.lm.transformer.wte.weight[5] += 1.0  # an in-place weight change, as an optimizer step
        policy(next(walk))
        assert encoded == [2, 2]
    policy.set_training_mode(False)
    assert cache.width == 0 and cache.layers is None


def test_cache_memory_stays_bounded(tiny_env_kwargs):
    model = make_ppo({**tiny_env_kwargs, "max_new_tokens": 4}, n_envs=4)
    policy, cache = model.policy, model.policy.rollout_cache
    policy.set_training_mode(False)
    window = model.observation_space["input_ids"].shape[-1]
    widths, sizes = [], []
    with torch.no_grad():
        for obs in random_walk(model.env, steps=300, lengths=STAGGERED):  # 5 > max_new_tokens: truncated
            policy(obs)
            widths.append(cache.width)
            sizes.append(cache.nbytes)
    config = policy.lm.config
    bound = 4 * window * (8 + config.n_layer * 2 * config.n_embd * 4)  # mask int64 + fp32 keys and values
    assert max(widths) <= window and max(sizes) <= bound
    assert max(widths[150:]) <= max(widths[:150])  # no growth over a long run


def test_a_model_whose_cache_cannot_be_used_fails_at_construction(tiny_env_kwargs, monkeypatch):
    from transformers.cache_utils import DynamicLayer

    monkeypatch.setattr(DynamicLayer, "is_sliding", True)  # as a sliding-window model's cache would be
    with pytest.raises(RuntimeError, match="kv_cache=False"):
        make_ppo(tiny_env_kwargs, n_envs=1)
    make_ppo(tiny_env_kwargs, n_envs=1, policy_kwargs=dict(kv_cache=False))


def test_rollouts_use_the_cache_argument_transformers_names_now(tiny_env_kwargs):
    """No deprecated ``past_key_values`` argument: the rollout passes the name ``forward`` declares."""
    import inspect
    import warnings

    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=tiny_env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=16))
    name = kv_cache_module.cache_argument(model.policy.lm.base_model)
    assert name in inspect.signature(model.policy.lm.base_model.forward).parameters
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        model.learn(16)  # a cached rollout, then an update
