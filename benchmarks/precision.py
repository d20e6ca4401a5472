"""PPO iteration cost and memory of the main job in float32 vs bfloat16 (issue 13). Prints a markdown table.

    python benchmarks/precision.py                  # SmolLM2-135M, sentiment job, ~6 min on 2 cores
    python benchmarks/precision.py --iterations 1

Each dtype runs the main job's PPO iteration (``examples/train_sentiment.py``'s settings: 8 envs x
32 steps, 16 new tokens, ``text_ppo_kwargs()``, KL penalty against a reference in the same dtype)
in a fresh subprocess (``benchmarks/performance.py``'s iteration case), so peak RSS is its own.
bfloat16 keeps float32 master weights for the optimizer (:mod:`agents.policy.precision`), so its
parameter memory is 14 bytes per weight (2 + 4 master + 8 Adam) instead of 16; what it saves is
activation memory and, on CPUs with bfloat16 matrix units, time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from performance import SENTIMENT_JOB, run_case  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=2, help="timed PPO iterations per dtype")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    print(f"PPO iteration of the main job (SmolLM2-135M, {args.n_envs} envs x 32 steps, 16 new tokens, KL penalty), "
          f"mean of {args.iterations}, {args.threads} torch threads\n")
    print("| LM dtype | rollout (policy + env) | reward model | reference model | update | total | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        r = run_case(args, ["iteration", args.n_envs, args.iterations, "TextGen-v0", SENTIMENT_JOB, {"dtype": dtype}])
        print(f"| {dtype} | {r['rollout']:.2f} | {r['reward model']:.2f} | {r['reference model']:.2f} | "
              f"{r['update']:.2f} | {r['total']:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
