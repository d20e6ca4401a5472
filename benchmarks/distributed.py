"""Data-parallel scaling on this machine: the main job's PPO iteration in 1 process and in N ranks. Prints markdown tables.

    python benchmarks/distributed.py                        # 1 x 2 threads against 2 ranks x 1 thread, ~6 min on 2 cores
    python benchmarks/distributed.py --iterations 1 --layouts 1x2 2x1

Each layout runs the same work per PPO iteration, the main job's (``examples/train_sentiment.py``'s
defaults: SmolLM2-135M-Instruct, the sentiment reward model, movie-review prompts, 16 new tokens,
``text_ppo_kwargs()``, adaptive KL penalty): 8 envs x 32 steps = 256 generated tokens per iteration,
split over the ranks (``8 / N`` envs each) and trained with :func:`agents.data_parallel` under
``torchrun --standalone`` (gloo on CPU, NCCL on a GPU). A layout ``RxT`` is R processes with T
torch threads each. After one warm-up iteration, the mean of ``--iterations`` iterations:

- seconds per iteration on rank 0, split into rollout (policy, env and reward model, reference
  model) and update (``PPO.train``: forward, backward, DDP's gradient all-reduce, optimizer);
- generated tokens per second: 256 / seconds per iteration (the run's tokens, every rank's);
- peak RSS per rank;
- communication: seconds of one all-reduce of every trainable parameter's gradient (135M float32,
  538 MB for SmolLM2), in DDP's 25 MB buckets, timed outside the backward pass (inside it, DDP
  overlaps the all-reduce with the backward of the layers below), and the optimizer steps per
  update, whose product bounds the communication cost of one update.

Results go to ``benchmarks/results/distributed.json`` as well. Run it alone: on 2 cores, a second busy
process changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
TOTAL_ENVS = 8
N_STEPS = 32
MAX_NEW_TOKENS = 16
BUCKET_BYTES = 25 * 2 ** 20  # DistributedDataParallel's default bucket_cap_mb


def all_reduce_seconds(parameters: list, repeats: int) -> float:
    """Seconds of one all-reduce of gradients shaped like ``parameters`` (torch parameters), in DDP-sized buckets (mean of ``repeats``)."""
    import torch
    import torch.distributed as dist

    numel = sum(p.numel() for p in parameters)
    per_bucket = BUCKET_BYTES // 4
    buckets = [torch.ones(min(per_bucket, numel - start)) for start in range(0, numel, per_bucket)]
    dist.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        for bucket in buckets:
            dist.all_reduce(bucket)
    dist.barrier()
    return (time.perf_counter() - start) / repeats


def worker(iterations: int, out: str) -> None:
    """One rank (or the only process): time the main job's iterations, write rank 0's figures to ``out``."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import AdaptiveKLController, KLPenaltyCallback, TransformerPolicy, data_parallel, local_device, text_ppo_kwargs
    from agents.distributed import collectives
    from performance import timed  # benchmarks/performance.py (this script's folder is on sys.path)

    world = int(os.environ.get("WORLD_SIZE", 1))
    n_envs = TOTAL_ENVS // world
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=dict(max_new_tokens=MAX_NEW_TOKENS))
    model = data_parallel(PPO(TransformerPolicy, env, seed=0, device=local_device(),
                              **text_ppo_kwargs(n_steps=N_STEPS)))
    clock = {"collect": 0.0, "update": 0.0}
    steps = {"optimizer": 0}
    step = model.policy.optimizer.step

    def counted_step(*args, **kwargs):
        steps["optimizer"] += 1
        return step(*args, **kwargs)

    model.policy.optimizer.step = counted_step
    model.collect_rollouts = timed(clock, "collect", model.collect_rollouts)
    model.train = timed(clock, "update", model.train)
    kl = KLPenaltyCallback(AdaptiveKLController(0.05, target=4.0))
    per_iteration = N_STEPS * TOTAL_ENVS
    model.learn(per_iteration, callback=kl)  # warm-up (and the reference model's loading)
    for key in clock:
        clock[key] = 0.0
    steps["optimizer"] = 0
    collectives.barrier()
    start = time.perf_counter()
    model.learn(iterations * per_iteration, callback=kl, reset_num_timesteps=False)
    collectives.barrier()
    seconds = (time.perf_counter() - start) / iterations
    result = {"world_size": world, "threads": torch.get_num_threads(), "envs_per_rank": n_envs,
              "seconds_per_iteration": seconds, "rollout": clock["collect"] / iterations,
              "update": clock["update"] / iterations, "tokens_per_second": per_iteration / seconds,
              "optimizer_steps_per_update": steps["optimizer"] / iterations,
              "peak_rss_mib": max(collectives.all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))}
    if collectives.is_data_parallel():
        trainable = [p for p in model.policy.parameters() if p.requires_grad]
        result["all_reduce_seconds"] = all_reduce_seconds(trainable, repeats=3)
        result["gradient_mib"] = sum(p.numel() for p in trainable) * 4 / 2 ** 20
    if collectives.rank() == 0:
        Path(out).write_text(json.dumps(result))


def run_layout(ranks: int, threads: int, iterations: int) -> dict:
    """Run one layout in fresh processes; rank 0's figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        script = [__file__, "--worker", "--threads", str(threads), "--iterations", str(iterations), "--out", str(out)]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
                    if ranks > 1 else [sys.executable])
        subprocess.run([*launcher, *script], env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


def tables(results: list[dict], iterations: int) -> str:
    """The benchmark's markdown tables (scaling, then communication) from its results; the first layout is the baseline."""
    base = results[0]["seconds_per_iteration"]
    lines = [f"Main job's PPO iteration ({TOTAL_ENVS} envs x {N_STEPS} steps = {TOTAL_ENVS * N_STEPS} generated tokens, "
             f"split over the ranks), mean of {iterations} after a warm-up", "",
             "| ranks x threads | envs per rank | s/iteration | rollout | update | generated tokens/s | speed-up "
             "| peak RSS per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['world_size']} x {r['threads']} | {r['envs_per_rank']} | {r['seconds_per_iteration']:.1f} | "
                     f"{r['rollout']:.1f} | {r['update']:.1f} | {r['tokens_per_second']:.1f} | "
                     f"{base / r['seconds_per_iteration']:.2f}x | {r['peak_rss_mib']:.0f} |")
    parallel = [r for r in results if "all_reduce_seconds" in r]
    if parallel:
        lines += ["", "Communication: one all-reduce of every trainable gradient (gloo, this machine's loopback)", "",
                  "| ranks | gradient (MiB, float32) | s per all-reduce | optimizer steps per update | bound per update (s) |",
                  "|---|---|---|---|---|"]
        for r in parallel:
            lines.append(f"| {r['world_size']} | {r['gradient_mib']:.0f} | {r['all_reduce_seconds']:.2f} | "
                         f"{r['optimizer_steps_per_update']:.0f} | "
                         f"{r['all_reduce_seconds'] * r['optimizer_steps_per_update']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", default=["1x2", "2x1"], help="RANKSxTHREADS, the first is the baseline")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        worker(args.iterations, args.out)
        return
    results = []
    for layout in args.layouts:
        ranks, threads = (int(part) for part in layout.split("x"))
        if TOTAL_ENVS % ranks:
            parser.error(f"{TOTAL_ENVS} envs do not split over {ranks} ranks")
        results.append(run_layout(ranks, threads, args.iterations))
        print(f"{layout}: {results[-1]}", file=sys.stderr, flush=True)
    print()
    print(tables(results, args.iterations))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"iterations": args.iterations, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
