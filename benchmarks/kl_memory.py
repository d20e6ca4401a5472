"""Peak memory and time of the KL callback's reference pass over one SB3-sized rollout. Prints a table.

    python benchmarks/kl_memory.py              # SmolLM2-135M, 2048 steps x 8 envs, ~3 min on 2 cores

With SB3's default ``n_steps=2048`` and 8 envs a rollout holds 16,384 transitions. The reference
pass of :class:`agents.KLPenaltyCallback` scores them with one forward per episode; before it ran
in chunks, the logits of all rows existed at once (16,384 x 49,152 float32 = 3.2 GB for SmolLM2).
The rollout here is synthetic but laid out as the callback sees one (env-major rows, episodes of
``T`` steps that extend a movie-review prompt by random tokens), so the forwards are the same as
for a real rollout. Each case runs in a fresh subprocess: its peak RSS is its own, model included.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch


def synthetic_rollout(n_steps: int, n_envs: int, max_new_tokens: int, seed: int = 0):
    """Token windows of ``n_envs`` envs x ``n_steps`` steps, env-major, episodes of ``max_new_tokens`` steps."""
    import textgym
    from textgym.env import TextGenEnv

    env = TextGenEnv(max_new_tokens=max_new_tokens, reward_model=lambda p, c: [0.0] * len(c))
    rng = np.random.default_rng(seed)
    ids, masks, actions = [], [], []
    for _ in range(n_envs * n_steps // max_new_tokens):
        prompt = env.prompts[int(rng.integers(len(env.prompts)))]
        prompt_ids = env.encode_prompts([prompt])[0]
        tokens = rng.integers(3, env.action_space.n, max_new_tokens).tolist()
        for t in range(max_new_tokens):
            obs = env.observation_space.encode(prompt_ids, tokens[:t])
            ids.append(obs["input_ids"])
            masks.append(obs["attention_mask"])
            actions.append(tokens[t])
    del textgym
    return torch.as_tensor(np.stack(ids)), torch.as_tensor(np.stack(masks)), torch.as_tensor(actions)


def child(chunk_size: int, n_steps: int, n_envs: int, max_new_tokens: int) -> dict:
    from agents import load_causal_lm
    from agents.algorithms.kl import reference_log_probs

    torch.set_num_threads(2)
    ids, mask, actions = synthetic_rollout(n_steps, n_envs, max_new_tokens)
    lm = load_causal_lm("textgym/SmolLM2-135M-Instruct-Q4_1").eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    log_probs = reference_log_probs(lm, ids, mask, actions, chunk_size=chunk_size)
    seconds = time.perf_counter() - start
    assert log_probs.shape == (len(actions),) and bool(torch.isfinite(log_probs).all())
    return dict(rows=len(actions), seconds=seconds, rss_before=before,
                peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-steps", type=int, default=2048)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[512, 16_384])
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(*json.loads(args.case))))
        return
    print(f"KL reference pass, SmolLM2-135M, {args.n_steps} steps x {args.n_envs} envs, episodes of "
          f"{args.max_new_tokens} tokens, 2 torch threads\n")
    print("| rows per forward chunk | rows | seconds | peak RSS before the pass (MiB) | peak RSS (MiB) | added by the pass (MiB) |")
    print("|---|---|---|---|---|---|")
    for chunk in args.chunk_sizes:
        case = json.dumps([chunk, args.n_steps, args.n_envs, args.max_new_tokens])
        out = subprocess.run([sys.executable, __file__, "--case", case], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {chunk:,} | {r['rows']:,} | {r['seconds']:.1f} | {r['rss_before']:,.0f} | {r['peak_rss']:,.0f} | "
              f"{r['peak_rss'] - r['rss_before']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
