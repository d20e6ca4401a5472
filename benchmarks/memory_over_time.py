"""Does memory stay flat over a long main-job run? RSS after every PPO iteration, and its slope (issue 13).

    python benchmarks/memory_over_time.py                 # 60 minutes of the main job on 2 cores
    python benchmarks/memory_over_time.py --minutes 5     # a quick look

Runs ``examples/train_sentiment.py``'s job (SmolLM2-135M, the default reward model and movie-review
prompts, 8 envs, ``text_ppo_kwargs()``, adaptive KL penalty) until ``--minutes`` have passed, and
records the process's resident set size (``VmRSS`` of ``/proc/self/status``, MiB) at the end of
every iteration. Prints a table of every tenth iteration and the least-squares slope of RSS
against wall time over the iterations after ``--warmup`` (allocator pools and lazily loaded
weights settle in the first few), in MiB per hour. A leak (a growing cache, logs or buffers kept
per iteration) shows as a steady positive slope.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import textgym  # noqa: F401  (registers TextGen-v0)
from agents import AdaptiveKLController, KLPenaltyCallback, TransformerPolicy, text_ppo_kwargs


def rss_mib() -> float:
    """Current resident set size of this process, MiB (Linux ``/proc/self/status``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class MemoryRecorder(BaseCallback):
    """After each rollout (the update of the previous iteration done): ``(seconds, timesteps, RSS MiB)``;
    stops training once ``seconds`` exceeds the budget."""

    def __init__(self, seconds: float):
        super().__init__()
        self.budget, self.start, self.rows = seconds, time.perf_counter(), []

    def _on_step(self) -> bool:
        return time.perf_counter() - self.start < self.budget

    def _on_rollout_end(self) -> None:
        self.rows.append((time.perf_counter() - self.start, self.num_timesteps, rss_mib()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--warmup", type=int, default=5, help="iterations left out of the slope")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    env = make_vec_env("TextGen-v0", n_envs=8, seed=0)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs())
    recorder = MemoryRecorder(args.minutes * 60)
    kl = KLPenaltyCallback(AdaptiveKLController(0.05, target=4.0))
    model.learn(total_timesteps=10**9, callback=[kl, recorder])

    rows = np.array(recorder.rows)
    print(f"main job, {len(rows)} iterations in {rows[-1, 0] / 60:.1f} min, {args.threads} torch threads\n")
    print("| iteration | minutes | timesteps | RSS (MiB) |")
    print("|---|---|---|---|")
    for i in sorted({*range(0, len(rows), 10), len(rows) - 1}):
        print(f"| {i + 1} | {rows[i, 0] / 60:.1f} | {int(rows[i, 1])} | {rows[i, 2]:.0f} |")
    settled = rows[args.warmup:]
    slope = np.polyfit(settled[:, 0] / 3600, settled[:, 2], 1)[0]
    late = rows[len(rows) // 2:]  # the second half: allocator pools have long settled
    late_slope = np.polyfit(late[:, 0] / 3600, late[:, 2], 1)[0] if len(late) > 1 else float("nan")
    print(f"\nRSS after warm-up (iteration {args.warmup + 1} on): min {settled[:, 2].min():.0f}, "
          f"max {settled[:, 2].max():.0f} MiB; least-squares slope {slope:+.1f} MiB/hour "
          f"({late_slope:+.1f} MiB/hour over the second half of the iterations)")


if __name__ == "__main__":
    main()
