"""Update cost: episode-grouped forward vs one forward per transition. Prints a markdown table.

For each model, collects one SB3 PPO rollout into :class:`agents.EpisodeRolloutBuffer`, then times
one epoch of what ``PPO.train`` does per minibatch (``evaluate_actions`` + backward) with
``share_prefix_forward`` on and off, on the same minibatches, in the same process::

    python benchmarks/grouped_update.py                     # tiny GPT-2 and SmolLM2-135M
    python benchmarks/grouped_update.py --models tiny       # seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import textgym
from agents import TransformerPolicy, text_ppo_kwargs
from textgym.synthetic import KeywordReward
from textgym.tiny import save_tiny_lm


def env_kwargs_for(model: str, tmp: str, max_new_tokens: int) -> dict:
    if model == "tiny":
        return dict(model_name_or_path=str(save_tiny_lm(tmp, n_positions=128)), prompts=["the movie was", "a film is"],
                    reward_model=KeywordReward(slots=max_new_tokens), max_prompt_tokens=8, max_new_tokens=max_new_tokens, eos_token_id=None)
    return dict(max_new_tokens=max_new_tokens, eos_token_id=None)  # full-length episodes: T exactly


def time_epoch(policy: TransformerPolicy, batches: list, grouped: bool) -> float:
    policy.share_prefix_forward = grouped
    start = time.perf_counter()
    for batch in batches:
        policy.zero_grad()
        values, log_prob, entropy = policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
        (values.sum() + log_prob.sum() + entropy.sum()).backward()
    return time.perf_counter() - start


def run(model: str, n_envs: int, max_new_tokens: int, batch_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs_for(model, tmp, max_new_tokens))
        n_steps = 2 * max_new_tokens
        ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=n_steps, batch_size=batch_size))
        ppo.learn(n_steps * n_envs)
        np.random.seed(0)
        batches = list(ppo.rollout_buffer.get(batch_size))
        transitions = sum(len(b.actions) for b in batches)
        grouped = time_epoch(ppo.policy, batches, grouped=True)
        per_transition = time_epoch(ppo.policy, batches, grouped=False)
    return dict(model=model, T=max_new_tokens, transitions=transitions, grouped=transitions / grouped,
                per_transition=transitions / per_transition, speedup=per_transition / grouped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, n_envs {args.n_envs}, textgym {textgym.__version__}\n")
    print("| model | T (new tokens) | transitions | grouped (transitions/s) | per transition (transitions/s) | speed-up | target T/2 |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models:
        for t in args.max_new_tokens:
            r = run(model, args.n_envs, t, args.batch_size)
            print(f"| {r['model']} | {r['T']} | {r['transitions']} | {r['grouped']:.1f} | {r['per_transition']:.1f} "
                  f"| {r['speedup']:.1f}x | {t / 2:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
