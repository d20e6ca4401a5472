"""Held-out evaluation with and without the KV-cached sampling path, against ``generate``. Prints a table.

    python benchmarks/evaluation_speed.py      # SmolLM2-135M on the reasoning demo's held-out questions, ~5 min

``agents.evaluate_against_reference`` samples the reference and the trained policy with
:func:`agents.training.evaluation.sample_episodes`. With ``kv_cache=False`` that is SB3's
``evaluate_policy`` through ``policy.predict``, a full forward over the window at every step;
with ``kv_cache=True`` it is the rollout path's per-env KV cache, in waves of episodes that start
together (each wave's prompts encoded in one batch, as ``generate`` encodes its batch). The middle
row is the KV cache through ``evaluate_policy`` (:class:`agents.training.evaluation.CachedSampler`), where
each env starts its next episode alone and envs that finished their share keep decoding. The table
gives sampled tokens/s of one policy's episodes (8 envs) and the whole evaluation's seconds (both
policies, plus scoring each episode under both LMs), next to ``model.generate`` on the same LM
and batch, twice: every reply the full 16 tokens (the rollout benchmark's ``generate_seconds``;
each prompt encoding is shared by more tokens than an episode that stops early gets), and each
reply ending at the env's stop token as an episode does, the batch running until its longest
reply has ended (``generate_until_stop_rate``, counting the tokens up to each stop). The second is
the like-for-like reference. Target: cached sampling >= 0.9 x generate.
"""

from __future__ import annotations

import time

import torch

from performance import REASONING_JOB, generate_seconds, generate_until_stop_rate


def main() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, evaluate_against_reference, text_ppo_kwargs
    from agents.training.evaluation import CachedSampler, _sample_episodes, sample_episodes

    torch.set_num_threads(2)
    n_envs, n_episodes = 8, 64
    env_kwargs = dict(REASONING_JOB, split="test")
    env = make_vec_env("TextGen-Reasoning-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs())
    policy = model.policy
    policy.set_training_mode(False)
    sample_episodes(policy, env, n_envs)  # warm-up
    print(f"Held-out evaluation, SmolLM2-135M chat on reasoning-gym chain_sum, {n_envs} envs, replies of up to "
          f"{REASONING_JOB['max_new_tokens']} tokens, {n_episodes} episodes per policy, 2 torch threads\n")
    print("| sampling path | sampled tokens/s (one policy) | mean episode length (tokens) "
          "| evaluate_against_reference, both policies (s) |")
    print("|---|---|---|---|")
    paths = {"predict (full forward per step), kv_cache=False": (lambda: sample_episodes(policy, env, n_episodes,
                                                                                           kv_cache=False), False),
             "KV cache through evaluate_policy (CachedSampler)": (
                 lambda: _sample_episodes(CachedSampler(policy), env, n_episodes, False), None),
             "KV cache in waves, kv_cache=True": (lambda: sample_episodes(policy, env, n_episodes), True)}
    rates = {}
    for name, (sample, kv_cache) in paths.items():
        env.seed(0)
        start = time.perf_counter()
        episodes = sample()
        tokens = sum(len(e["actions"]) for e in episodes)
        rates[name] = tokens / (time.perf_counter() - start)
        seconds = ""
        if kv_cache is not None:
            start = time.perf_counter()
            evaluate_against_reference(model, env, n_episodes=n_episodes, verbose=False, kv_cache=kv_cache)
            seconds = f"{time.perf_counter() - start:.0f}"
        print(f"| {name} | {rates[name]:.1f} | {tokens / len(episodes):.1f} | {seconds} |", flush=True)
    tokens = n_envs * REASONING_JOB["max_new_tokens"]
    rate = tokens / min(generate_seconds(policy.lm, env, REASONING_JOB["max_new_tokens"], repeats=3)[1:])
    print(f"| model.generate, same batch, {REASONING_JOB['max_new_tokens']} tokens per reply | {rate:.1f} "
          f"| {REASONING_JOB['max_new_tokens']} | |")
    until_stop, length = generate_until_stop_rate(policy.lm, env, REASONING_JOB["max_new_tokens"], repeats=8)
    print(f"| model.generate, same batch, each reply ending at its stop token | {until_stop:.1f} | {length:.1f} | |")
    waves = rates["KV cache in waves, kv_cache=True"]
    print(f"\nKV cache in waves / generate: {waves / until_stop:.2f} against replies that end at their stop token "
          f"(as the episodes do), {waves / rate:.2f} against {REASONING_JOB['max_new_tokens']}-token replies")


if __name__ == "__main__":
    main()
