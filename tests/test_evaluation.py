"""evaluate_against_reference: distinct-n, KL and perplexity against direct computations, table, TensorBoard."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from agents import TransformerPolicy, evaluate_against_reference, text_ppo_kwargs
from agents.training.evaluation import TextEvaluation, distinct_n, markdown_table, write_summary
from tests.conftest import keyword_reward
from tests.scripted import script_stops
from textgym.env import load_tokenizer

LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)


def make_model(env_kwargs, **policy_kwargs):
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    return PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=16, n_epochs=2, learning_rate=1e-2,
                                                                 policy_kwargs=policy_kwargs))


def direct_log_probs(lm, tokenizer, prompt: str, tokens: list[int]) -> np.ndarray:
    """log p(token_t | prompt, tokens_<t) from one forward over the unpadded text."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + tokens])
    with torch.no_grad():
        log_probs = torch.log_softmax(lm(ids).logits[0].double(), -1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return log_probs[positions, ids[0, positions + 1]].numpy()


def test_distinct_n_counts_whitespace_ngrams_within_each_text():
    texts = ["the cat sat", "the  cat ran\n", "a", ""]
    # unigrams: the cat sat the cat ran a -> 5 distinct of 7; bigrams: (the cat) x2, (cat sat), (cat ran) -> 3 of 4
    # ("sat the" spans two texts and is not a bigram).
    assert distinct_n(texts, 1) == 5 / 7
    assert distinct_n(texts, 2) == 3 / 4
    assert distinct_n(["A a a"], 1) == 2 / 3  # case is kept
    assert math.isnan(distinct_n(["a", ""], 2))
    with pytest.raises(ValueError, match="n must be >= 1"):
        distinct_n(texts, 0)


def test_policy_equal_to_reference_gives_zero_kl_and_direct_perplexity(tiny_env_kwargs, tiny_lm, tmp_path, capsys):
    model = make_model(tiny_env_kwargs)  # untrained: the reference (a fresh copy) has the same weights
    env = make_vec_env("TextGen-v0", n_envs=2, seed=5, env_kwargs=tiny_env_kwargs)
    results = evaluate_against_reference(model, env, n_episodes=6, tensorboard_log=tmp_path, tag="heldout", step=3)
    reference, trained = results["reference"], results["trained"]
    assert reference.n_episodes == trained.n_episodes == 6
    assert sorted(e.prompt for e in reference.episodes) == sorted(e.prompt for e in trained.episodes)

    assert [e.kl for e in trained.episodes] == [0.0] * 6  # two LMs with the same weights: exactly 0
    assert trained.kl_mean == 0.0 and trained.kl_sem == 0.0 and reference.kl_mean == 0.0

    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = load_tokenizer(tiny_lm)
    for result in (reference, trained):
        nll = -np.concatenate([direct_log_probs(lm, tokenizer, e.prompt, e.tokens) for e in result.episodes])
        assert result.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-5)
        completions = [e.completion for e in result.episodes]
        prompts = [e.prompt for e in result.episodes]
        rewards = np.array(keyword_reward(prompts, completions))
        assert result.reward_mean == pytest.approx(rewards.mean(), abs=1e-12)
        assert result.reward_sem == pytest.approx(rewards.std(ddof=1) / math.sqrt(6), abs=1e-12)
        assert result.length_mean == np.mean([len(e.tokens) for e in result.episodes])
        assert result.distinct_1 == distinct_n(completions, 1) and result.distinct_2 == distinct_n(completions, 2)

    printed = capsys.readouterr().out
    assert "| policy | mean reward (± s.e.) | KL to reference (nats/episode, ± s.e.) |" in printed
    assert f"| reference | {reference.reward_mean:+.3f} ± {reference.reward_sem:.3f} | 0.00 ± 0.00 |" in printed
    assert f"| trained | {trained.reward_mean:+.3f} ± {trained.reward_sem:.3f} | 0.00 ± 0.00 |" in printed
    assert "prompt: " in printed

    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    table = events.Tensors("heldout/table/text_summary")[0]
    assert table.step == 3
    assert "| trained |" in table.tensor_proto.string_val[0].decode()
    samples = events.Tensors("heldout/samples/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "    prompt: " in samples and "    " + "  reference [" in samples


def test_lora_policy_is_compared_with_its_disabled_adapters(tiny_env_kwargs, tiny_lm, monkeypatch):
    model = make_model(tiny_env_kwargs, lora_config=LORA)
    model.learn(32)  # adapters move at lr 1e-2
    env = make_vec_env("TextGen-v0", n_envs=2, seed=5, env_kwargs=tiny_env_kwargs)
    results = evaluate_against_reference(model, env, n_episodes=6, verbose=False)
    reference, trained = results["reference"], results["trained"]
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tokenizer = load_tokenizer(tiny_lm)
    expected_kl = []
    for episode in trained.episodes:
        ref = direct_log_probs(base, tokenizer, episode.prompt, episode.tokens)
        np.testing.assert_allclose(episode.ref_log_probs, ref, rtol=0, atol=1e-5)
        with torch.no_grad():
            pi = direct_log_probs(model.policy.lm, tokenizer, episode.prompt, episode.tokens)
        expected_kl.append((pi - ref).sum())
    assert trained.kl_mean == pytest.approx(np.mean(expected_kl), abs=1e-5)
    assert abs(trained.kl_mean) > 1e-3  # the adapters trained: the comparison is not trivially 0
    assert reference.kl_mean == 0.0
    # the reference row was sampled and scored by the base model
    nll = -np.concatenate([direct_log_probs(base, tokenizer, e.prompt, e.tokens) for e in reference.episodes])
    assert reference.perplexity == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_bad_episode_count_is_rejected(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs)
    with pytest.raises(ValueError, match="n_episodes"):
        evaluate_against_reference(model, model.get_env(), n_episodes=0)


def test_reward_components_get_a_column_with_mean_and_standard_error(tiny_env_kwargs, tmp_path):
    def components(prompts, completions):
        good = np.array([c.split().count("good") for c in completions], dtype=float)
        return {"score": good / 4, "good_words": good, "long": np.array([float(len(c.split()) >= 3) for c in completions])}

    env_kwargs = dict(tiny_env_kwargs, reward_model=components)
    model = make_model(env_kwargs)
    env = make_vec_env("TextGen-v0", n_envs=2, seed=5, env_kwargs=env_kwargs)
    results = evaluate_against_reference(model, env, n_episodes=8, verbose=False)
    for result in results.values():
        good = np.array([e.components["good_words"] for e in result.episodes])
        long = np.array([e.components["long"] for e in result.episodes])
        assert list(result.components) == ["good_words", "long"]
        assert result.components["good_words"] == pytest.approx((good.mean(), good.std(ddof=1) / math.sqrt(8)))
        assert result.components["long"][0] == pytest.approx(long.mean())
        assert result.reward_mean == pytest.approx(good.mean() / 4)
    header, rule, *rows = markdown_table(results).splitlines()
    assert "| good_words (± s.e.) | long (± s.e.) |" in header and rule.count("---") == 9
    trained = results["trained"].components["good_words"]
    assert rows[1].split(" | ")[2] == f"{trained[0]:.3f} ± {trained[1]:.3f}"

    # What a run over seeds keeps of it (the demos' --results-json): every figure, no episodes.
    path = tmp_path / "run.json"
    write_summary(str(path), results, seed=3, wall_seconds=1.5)
    saved = json.loads(path.read_text())
    assert saved["seed"] == 3 and saved["wall_seconds"] == 1.5
    assert saved["trained"]["components"]["good_words"] == list(trained)
    assert saved["reference"]["reward_mean"] == results["reference"].reward_mean
    assert set(saved["trained"]) == {f.name for f in dataclasses.fields(TextEvaluation)} - {"episodes"}


def test_cached_sampler_draws_from_the_uncached_policy(tiny_env_kwargs, monkeypatch):
    """Log-probs of the actions the KV-cached sampler drew equal the uncached policy's (same distribution).

    Staggered episode ends are built: each episode stops as its k-th token for a k-token prompt
    (tests.scripted; the prompts have 2, 3 and 4 tokens), so in some step an env starts a new
    episode (a re-encoded row) while another continues (a cached step), whatever is sampled."""
    from agents.training.evaluation import CachedSampler

    model = make_model(tiny_env_kwargs)
    model.learn(32)  # trained weights, not the initial ones
    policy = model.policy
    script_stops(monkeypatch, policy)
    env = make_vec_env("TextGen-v0", n_envs=3, seed=1, env_kwargs=tiny_env_kwargs)
    sampler = CachedSampler(policy)
    obs, observations, actions, dones = env.reset(), [], [], []
    for _ in range(15):  # several episodes per env, staggered ends
        action, _ = sampler.predict(obs)
        observations.append(obs)
        actions.append(action)
        obs, _, done, _ = env.step(action)
        dones.append(done)
    assert policy.rollout_cache.layers is not None  # the cache served these steps
    dones = np.array(dones[:-1])  # the premise: some step re-encodes a row while another row continues
    assert (dones.any(1) & ~dones.all(1)).any(), dones
    batch = {k: torch.as_tensor(np.concatenate([o[k] for o in observations])) for k in ("input_ids", "attention_mask")}
    policy.share_prefix_forward = False  # SB3's own per-observation forward: the direct computation
    with torch.no_grad():
        _, expected, _ = policy.evaluate_actions(batch, torch.as_tensor(np.concatenate(actions)))
    torch.testing.assert_close(torch.as_tensor(np.concatenate(sampler.log_probs)), expected, rtol=0, atol=1e-5)


def test_cached_evaluation_of_the_reference_itself_gives_zero_kl(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs)
    env = make_vec_env("TextGen-v0", n_envs=2, seed=5, env_kwargs=tiny_env_kwargs)
    results = evaluate_against_reference(model, env, n_episodes=6, verbose=False, kv_cache=True)
    assert results["trained"].n_episodes == results["reference"].n_episodes == 6
    assert [e.kl for e in results["trained"].episodes] == [0.0] * 6
    assert sorted(e.prompt for e in results["reference"].episodes) == sorted(e.prompt for e in results["trained"].episodes)


def staggered(env_kwargs) -> dict:
    """Tiny TextGen arguments with a 6-token generation limit, for episodes staggered by ``script_stops``."""
    return {**env_kwargs, "max_new_tokens": 6}


def assert_staggered(episodes) -> None:
    """The premise the script built: each episode is as long as its prompt (2, 3 or 4 tokens), and
    the episodes drawn end at different steps."""
    assert all(len(e["actions"]) == len(e["prompt"].split()) for e in episodes)
    assert len({len(e["actions"]) for e in episodes}) > 1  # episodes ended at different steps


def test_waves_draw_the_episodes_of_evaluate_policy(tiny_env_kwargs, monkeypatch):
    """Greedy decoding: the KV-cached waves give exactly the episodes of SB3's evaluate_policy + predict
    (same prompts per env, same tokens, same rewards), with 7 episodes split unevenly over 3 envs.
    Episodes end at different steps by construction: greedy among the non-stop tokens, then EOS
    as the k-th token after a k-token prompt (tests.scripted), whatever the trained weights."""
    from agents.training.evaluation import _wave_envs, sample_episodes

    model = make_model(staggered(tiny_env_kwargs))
    model.learn(32)
    script_stops(monkeypatch, model.policy)
    env = make_vec_env("TextGen-v0", n_envs=3, seed=4, env_kwargs=staggered(tiny_env_kwargs))
    assert _wave_envs(env) is not None  # the waves, not the evaluate_policy fallback
    runs = {}
    for kv_cache in (True, False):
        env.seed(3)
        runs[kv_cache] = sample_episodes(model.policy, env, 7, deterministic=True, kv_cache=kv_cache)

    def key(episode):
        return episode["prompt"], tuple(episode["actions"]), episode["reward"]

    assert len(runs[True]) == 7 and sorted(map(key, runs[True])) == sorted(map(key, runs[False]))
    assert_staggered(runs[True])
    assert len({e["prompt"] for e in runs[True]}) > 1


def test_waves_sample_from_the_uncached_policy(tiny_env_kwargs, monkeypatch):
    """Sampling in waves: each drawn token's log-prob equals SB3's own uncached per-observation forward,
    and the prompts are encoded once per wave, in one batch. Staggered ends (rows leave a wave
    while others go on) are built by ``script_stops``, as above."""
    from agents.training.evaluation import sample_episodes
    from agents.policy.kv_cache import RolloutKVCache

    model = make_model(staggered(tiny_env_kwargs))
    model.learn(32)
    policy = model.policy
    script_stops(monkeypatch, policy)
    encoded = []
    real_encode = RolloutKVCache._encode
    monkeypatch.setattr(RolloutKVCache, "_encode", lambda self, rows, *a: encoded.append(len(rows)) or
                        real_encode(self, rows, *a))
    episodes = sample_episodes(policy, make_vec_env("TextGen-v0", n_envs=3, seed=4,
                                                    env_kwargs=staggered(tiny_env_kwargs)), 12)
    assert_staggered(episodes)
    assert encoded == [3, 3, 3, 3]  # 4 waves of 3 episodes; between them, rows only took cached steps
    batch = {k: torch.as_tensor(np.stack([o[k] for e in episodes for o in e["obs"]])) for k in ("input_ids", "attention_mask")}
    actions = torch.as_tensor([a for e in episodes for a in e["actions"]])
    policy.share_prefix_forward = False
    with torch.no_grad():
        _, expected, _ = policy.evaluate_actions(batch, actions)
    torch.testing.assert_close(torch.as_tensor(np.concatenate([e["log_probs"] for e in episodes])), expected,
                               rtol=0, atol=1e-5)


def test_waves_leave_reward_changing_vec_env_wrappers_to_evaluate_policy(tiny_env_kwargs):
    from stable_baselines3.common.vec_env import VecNormalize

    from agents.training.evaluation import _wave_envs, sample_episodes
    from textgym.vec_env import BatchedRewards, GroupedPrompts

    env = make_vec_env("TextGen-v0", n_envs=2, seed=4, env_kwargs=tiny_env_kwargs)
    assert _wave_envs(GroupedPrompts(BatchedRewards(env), 2)) == env.envs
    normalized = VecNormalize(env, norm_obs=False, gamma=1.0)
    assert _wave_envs(normalized) is None
    episodes = sample_episodes(make_model(tiny_env_kwargs).policy, normalized, 3)
    assert len(episodes) == 3 and "log_probs" not in episodes[0]
