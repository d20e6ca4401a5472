"""Episode-grouped evaluation equals per-transition evaluation; the buffer batches whole episodes."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.env_util import make_vec_env

from agents import EpisodeRolloutBuffer, TransformerPolicy, text_ppo_kwargs
from agents.algorithms.buffers import storage_dtype
from textgym.spaces import TokenWindowSpace
from agents.policy import prefix_sharing
from agents.policy.prefix_sharing import covering_rows
from tests.scripted import script_stops


def test_covering_rows_picks_the_longest_extension_with_the_same_start():
    ids = torch.tensor([
        [0, 5, 6, 0, 0],  # 0: prefix of rows 1 and 2 -> longest is 2
        [0, 5, 6, 7, 0],  # 1: prefix of 2
        [0, 5, 6, 7, 8],  # 2
        [0, 5, 9, 0, 0],  # 3: differs at position 2 -> itself
        [5, 6, 7, 0, 0],  # 4: same tokens, different start -> itself
        [0, 5, 6, 7, 8],  # 5: identical to 2 -> 2 (lowest index)
    ])
    mask = torch.tensor([
        [0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1],
    ])
    assert covering_rows(ids, mask).tolist() == [2, 2, 2, 3, 4, 2]
    assert covering_rows(ids, mask, chunk=2).tolist() == [2, 2, 2, 3, 4, 2]


def collect(env_kwargs, buffer_class=EpisodeRolloutBuffer, n_envs=3, n_steps=10, monkeypatch=None):
    """One rollout (and one update). With ``monkeypatch``, episode lengths are scripted: each episode
    stops as its (k + 1)-th token after a k-token prompt (3, 4 or 5 tokens; 5 is cut at 4 when
    ``max_new_tokens`` is 4), so episodes of different lengths, most of several steps, are built."""
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=n_steps, batch_size=6,
                                                                 rollout_buffer_class=buffer_class))
    if monkeypatch is not None:
        script_stops(monkeypatch, model.policy, stop_at=lambda prompt: len(prompt) + 1)
    model.learn(n_steps * n_envs)
    return model


def segment_lengths(buffer) -> list[int]:
    """Lengths of the buffer's episode segments (after ``get``), in its flattened order."""
    bounds = [*buffer._segment_starts, buffer.buffer_size * buffer.n_envs]
    return [hi - lo for lo, hi in zip(bounds[:-1], bounds[1:])]


def assert_grouped_equals_per_transition(policy, batch) -> dict:
    """``evaluate_actions`` on ``batch`` with ``share_prefix_forward`` on and off gives the same values,
    log-probs and entropies, and the same gradients of their sum; returns ``{grouped: (values, log_prob,
    entropy, grads)}``."""
    actions = batch.actions.long().flatten()
    results = {}
    try:
        for grouped in (True, False):
            policy.share_prefix_forward = grouped
            policy.zero_grad()
            values, log_prob, entropy = policy.evaluate_actions(batch.observations, actions)
            (values.sum() + log_prob.sum() + entropy.sum()).backward()
            results[grouped] = (values, log_prob, entropy, [p.grad.clone() for p in policy.parameters()])
    finally:
        policy.share_prefix_forward = True
    for got, expected in zip(results[True][:3], results[False][:3]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for got, expected in zip(results[True][3], results[False][3]):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    return results


def test_grouped_values_log_probs_entropy_and_gradients_equal_per_transition(tiny_env_kwargs, monkeypatch):
    model = collect({**tiny_env_kwargs, "max_new_tokens": 5}, monkeypatch=monkeypatch)
    policy = model.policy
    batch = next(model.rollout_buffer.get(batch_size=None))
    # The premise, built: episodes of 3 to 5 steps, so grouping really shares forwards (at most 4
    # segments in an env's 10 rows, 12 of the 30) over rows of different lengths.
    lengths = segment_lengths(model.rollout_buffer)
    assert len(lengths) <= 12 and len(set(lengths)) > 1, lengths
    results = assert_grouped_equals_per_transition(policy, batch)
    # Sanity: the log-probs are those the rollout stored (the update changed the weights a little).
    torch.testing.assert_close(results[False][1], batch.old_log_prob, rtol=0, atol=0.1)


def test_grouped_forward_runs_one_sequence_per_episode(tiny_env_kwargs, monkeypatch):
    model = collect(tiny_env_kwargs, monkeypatch=monkeypatch)
    rows_seen = []
    original = prefix_sharing.lm_hidden_states
    monkeypatch.setattr(prefix_sharing, "lm_hidden_states",
                        lambda lm, ids, mask: rows_seen.append(len(ids)) or original(lm, ids, mask))
    batch = next(model.rollout_buffer.get(batch_size=None))
    with torch.no_grad():
        model.policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
    segments = len(model.rollout_buffer._segment_starts)
    assert rows_seen == [segments]
    assert segments < len(batch.actions) / 2  # built: episodes of 3 or 4 steps, at most 12 segments of 30 rows


def test_buffer_yields_every_transition_once_in_whole_episode_segments(tiny_env_kwargs, monkeypatch):
    buffer = collect(tiny_env_kwargs, n_envs=2, n_steps=12, monkeypatch=monkeypatch).rollout_buffer
    batches = []
    original = buffer._get_samples
    buffer._get_samples = lambda inds, env=None: batches.append(inds) or original(inds)
    list(buffer.get(batch_size=8))
    total = 24
    np.testing.assert_array_equal(np.sort(np.concatenate(batches)), np.arange(total))
    assert all(len(inds) >= 8 for inds in batches[:-1])
    batch_of = np.empty(total, dtype=int)
    for k, inds in enumerate(batches):
        batch_of[inds] = k
    generated = buffer.observations["attention_mask"][:, 5:].sum(1)  # flattened: env-major order
    bounds = [*buffer._segment_starts, total]
    # The premise, built by scripted episodes of 3 and 4 steps: slicing the rollout every 8 rows
    # would split a segment, so keeping segments whole is the buffer's work.
    assert any(lo // 8 != (hi - 1) // 8 for lo, hi in zip(bounds[:-1], bounds[1:])), bounds
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert len(set(batch_of[lo:hi])) == 1, "a segment was split across minibatches"
        # A segment is one episode's consecutive steps: 0, 1, 2, ... tokens generated, unless it
        # continues an episode from the previous rollout at the start of an env's stretch.
        assert generated[lo] == 0 or lo % 12 == 0
        np.testing.assert_array_equal(np.diff(generated[lo:hi]), 1)


def test_gae_and_storage_match_sb3_dict_buffer(tiny_env_kwargs):
    ours = collect(tiny_env_kwargs).rollout_buffer
    theirs = collect(tiny_env_kwargs, buffer_class=DictRolloutBuffer).rollout_buffer
    for name in ("rewards", "values", "log_probs", "advantages", "returns", "episode_starts", "actions"):
        np.testing.assert_array_equal(getattr(ours, name).reshape(-1), getattr(theirs, name).reshape(-1))
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(ours.observations[key], theirs.observations[key])


def test_storage_is_compact_and_samples_come_back_in_the_space_dtypes(tiny_env_kwargs):
    buffer = collect(tiny_env_kwargs).rollout_buffer  # vocabulary of 19 tokens, window 5 + 4
    assert buffer.observations["input_ids"].dtype == np.uint8
    assert buffer.observations["attention_mask"].dtype == np.uint8
    assert buffer.actions.dtype == np.uint8
    assert buffer.bytes_per_transition == 9 + 9 + 1 + 6 * 4  # ids, mask, action, six float32 fields
    next(buffer.get(batch_size=None))  # flattens the storage, (n_envs * n_steps, ...)
    batch = buffer._get_samples(np.arange(len(buffer.observations["input_ids"])))
    assert batch.observations["input_ids"].dtype == torch.int64
    assert batch.observations["attention_mask"].dtype == torch.int8
    np.testing.assert_array_equal(batch.observations["input_ids"].numpy(), buffer.observations["input_ids"])


def test_storage_dtype_is_sized_to_the_vocabulary():
    for vocab, dtype in ((19, np.uint8), (256, np.uint8), (257, np.uint16), (49_152, np.uint16), (65_537, np.uint32)):
        space = TokenWindowSpace(vocab, 4, 4)
        assert storage_dtype(space["input_ids"]) == dtype
        assert storage_dtype(gym.spaces.Discrete(vocab)) == dtype
    assert storage_dtype(space["attention_mask"]) == np.uint8
    assert storage_dtype(gym.spaces.Box(-1.0, 1.0, (2,))) == np.float32


def test_gae_with_gamma_one_is_the_terminal_reward_minus_value(tiny_env_kwargs):
    """GAE (Schulman et al. 2016) with gamma = lambda = 1: advantage = final reward - V(s_t) within an episode."""
    env = make_vec_env("TextGen-v0", n_envs=1, seed=0, env_kwargs=tiny_env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=8, gae_lambda=1.0))
    model.learn(8)
    buffer = model.rollout_buffer
    rewards, values = buffer.rewards[:, 0], buffer.values[:, 0]
    starts = buffer.episode_starts[:, 0]
    episode = np.cumsum(starts)
    checked = 0
    for e in np.unique(episode):
        steps = np.flatnonzero(episode == e)
        if steps[-1] == len(rewards) - 1:
            continue  # unfinished at the rollout end: bootstrapped, checked by SB3's own tests
        np.testing.assert_allclose(buffer.returns[steps, 0], rewards[steps[-1]], rtol=0, atol=1e-6)
        np.testing.assert_allclose(buffer.advantages[steps, 0], rewards[steps[-1]] - values[steps], rtol=0, atol=1e-6)
        checked += 1
    assert checked >= 1  # built: the first episode ends by step 4 of 8 (max_new_tokens=4), whatever is sampled


def test_sb3_default_buffer_warns_once_at_the_first_update(make_tiny_env):
    import warnings

    # No stop token: episodes of 8 steps whatever is sampled, so what a minibatch holds depends only
    # on the buffer's (numpy-seeded) shuffle.
    env = make_vec_env(make_tiny_env, n_envs=2, seed=0, env_kwargs=dict(max_new_tokens=8, eos_token_id=None))
    # SB3's own buffer shuffles single steps: a minibatch of 16 holds a step or two of many episodes.
    plain = PPO(TransformerPolicy, env, n_steps=64, batch_size=16, n_epochs=2, seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain.learn(256)  # two updates of 16 minibatches
    ungrouped = [w for w in caught if "not grouped by episode" in str(w.message)]
    assert len(ungrouped) == 1 and "text_ppo_kwargs" in str(ungrouped[0].message)
    grouped = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=64, batch_size=16, n_epochs=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grouped.learn(256)
    assert not [w for w in caught if "not grouped by episode" in str(w.message)]


def test_update_runs_the_prompt_every_episode_shares_once(tiny_env_kwargs, monkeypatch):
    """With one prompt for every episode (an RLOO/GRPO group, a system turn, a game's rules), the update
    encodes it once per minibatch and lets each episode read its keys and values; values, log-probs,
    entropies and gradients equal the per-transition forward's."""
    model = collect({**tiny_env_kwargs, "prompts": ["the film was very"], "max_new_tokens": 5}, monkeypatch=monkeypatch)
    policy = model.policy
    batch = next(model.rollout_buffer.get(batch_size=None))
    policy.min_shared_prefix = 4  # the tiny prompt: 4 tokens
    shared_calls = []
    original = prefix_sharing.prefix_then_rest_hidden
    monkeypatch.setattr(prefix_sharing, "prefix_then_rest_hidden",
                        lambda lm, ids, mask, prefix: shared_calls.append((len(ids), prefix)) or original(lm, ids, mask, prefix))
    assert_grouped_equals_per_transition(policy, batch)
    # The premise: one call for the minibatch's episodes (several, of different lengths), sharing the 4 prompt tokens.
    episodes = len(torch.unique(covering_rows(batch.observations["input_ids"].long(),
                                              batch.observations["attention_mask"].long())))
    assert shared_calls == [(episodes, 4)] and episodes > 2
