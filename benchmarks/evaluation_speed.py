"""Held-out evaluation with and without the KV-cached sampling path, against ``generate``. Prints a table.

    python benchmarks/evaluation_speed.py      # SmolLM2-135M on the reasoning demo's held-out questions, ~4 min

``agents.evaluate_against_reference`` samples the reference and the trained policy through SB3's
``evaluate_policy``. With ``kv_cache=False`` that is ``policy.predict``, a full forward over the
window at every step; with ``kv_cache=True`` it is :class:`agents.evaluation.CachedSampler`, the
rollout path's per-env KV cache. The table gives sampled tokens/s of one policy's episodes (8
envs) and the whole evaluation's seconds (both policies, plus scoring each episode under both
LMs), next to ``model.generate`` on the same LM, batch and reply length (the rollout benchmark's
``generate_seconds``). Target: cached sampling >= 0.8 x generate.
"""

from __future__ import annotations

import time

import torch

from performance import REASONING_JOB, generate_seconds


def main() -> None:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, evaluate_against_reference, text_ppo_kwargs
    from agents.evaluation import CachedSampler, _sample_episodes

    torch.set_num_threads(2)
    n_envs, n_episodes = 8, 64
    env_kwargs = dict(REASONING_JOB, split="test")
    env = make_vec_env("TextGen-Reasoning-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs())
    policy = model.policy
    policy.set_training_mode(False)
    _sample_episodes(CachedSampler(policy), env, n_envs, False)  # warm-up
    print(f"Held-out evaluation, SmolLM2-135M chat on reasoning-gym chain_sum, {n_envs} envs, replies of up to "
          f"{REASONING_JOB['max_new_tokens']} tokens, {n_episodes} episodes per policy, 2 torch threads\n")
    print("| sampling path | sampled tokens/s (one policy) | evaluate_against_reference, both policies (s) |")
    print("|---|---|---|")
    for cached in (False, True):
        env.seed(0)
        start = time.perf_counter()
        episodes = _sample_episodes(CachedSampler(policy) if cached else policy, env, n_episodes, False)
        rate = sum(len(e["actions"]) for e in episodes) / (time.perf_counter() - start)
        start = time.perf_counter()
        evaluate_against_reference(model, env, n_episodes=n_episodes, verbose=False, kv_cache=cached)
        seconds = time.perf_counter() - start
        print(f"| {'KV cache (CachedSampler)' if cached else 'predict (full forward per step)'} | {rate:.1f} | "
              f"{seconds:.0f} |", flush=True)
    tokens = n_envs * REASONING_JOB["max_new_tokens"]
    rate = tokens / min(generate_seconds(policy.lm, env, REASONING_JOB["max_new_tokens"], repeats=3)[1:])
    print(f"| model.generate, same batch and length | {rate:.1f} | |")


if __name__ == "__main__":
    main()
