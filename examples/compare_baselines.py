"""Sanity suite: the same upstream SB3 PPO on classic control and on textgym's synthetic text tasks.

Classic control uses rl-baselines3-zoo's published PPO hyperparameters and is compared with the
zoo's benchmark scores; the synthetic text tasks (:data:`textgym.TASKS`) use their own recommended
settings and are compared with their exact chance level and their optimum (1.0). If our PPO matches
the zoo on classic control and gets far above chance on the text tasks, the RL side and the text
side are both wired correctly. Several seeds per task run in parallel worker processes (one torch
thread each); the script prints a markdown table and writes, under ``--out``:

- ``tensorboard/<task>_seed<k>_1/``: SB3's TensorBoard logs of every run (``tensorboard --logdir``),
- ``monitor/<task>/seed<k>/*.monitor.csv``: SB3 ``Monitor`` files (one row per training episode:
  return ``r``, length ``l``, seconds since start ``t``),
- ``learning_curves.png`` (all tasks) and ``curve_<task>.png``: episodic training return vs
  environment steps, mean +/- std over seeds,
- ``results.md`` (the table) and ``results.json`` (every seed's score and wall time).

::

    python examples/compare_baselines.py                          # full suite, 3 seeds: 38 min on a shared 2-core CPU
    python examples/compare_baselines.py --quick                  # CartPole-v1 + keyword, 2 seeds: 40-45 s
    python examples/compare_baselines.py --tasks CartPole-v1 copy --seeds 0 1 2 3 --out runs/mine
    python examples/compare_baselines.py --tasks CartPole-v1 CartPole-v1-2ranks   # one process against 2 ranks

The row ``CartPole-v1-2ranks`` is the same training run data-parallel (:func:`agents.data_parallel`,
DD-PPO): 2 ranks under ``torchrun`` with half the zoo's envs and half its minibatch each, so an
iteration collects the same transitions and each optimizer step averages two half minibatches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ZOO_SOURCE = "rl-baselines3-zoo's hyperparams/ppo.yml as shipped in rl-zoo3==2.9.2"
"""Where the classic-control hyperparameters below come from (DLR-RM/rl-baselines3-zoo on GitHub)."""

BUDGET_NOTE = (
    "rl-zoo trains Acrobot-v1, MountainCar-v0 and LunarLander on 1e6 steps; for the whole suite to fit "
    "in 60 minutes on a 2-core CPU they run on 2e5, 3e5 and 2e5 steps here (steps column: ours / zoo's), "
    "with 3 seeds. CartPole-v1 and Pendulum-v1 use the zoo's full 1e5. SB3 trains whole rollouts, so it "
    "rounds a budget up to a multiple of n_steps * n_envs (LunarLander-v3: 212,992 steps for 200,000)."
)


@dataclass(frozen=True)
class Benchmark:
    """One row of the comparison: an environment, how PPO trains on it, and what to compare with.

    :param name: key for ``--tasks`` (Gymnasium id for classic control, :data:`textgym.TASKS` key for text).
    :param env_id: Gymnasium id.
    :param total_timesteps: environment steps of the full suite (summed over the ``n_envs`` envs).
    :param quick_timesteps: environment steps with ``--quick``.
    :param n_envs: parallel envs in the ``DummyVecEnv``.
    :param ppo_kwargs: keyword arguments of ``stable_baselines3.PPO`` (besides policy and env).
    :param normalize: rl-zoo's ``normalize: true``: train under ``VecNormalize`` (observations and
        rewards), evaluate with its observation statistics frozen and raw rewards.
    :param zoo_timesteps: the budget of the reference score (steps).
    :param reference: the score to compare with (rl-zoo benchmark, or the text task's optimum).
    :param chance: exact expected reward of the uniform random policy (text tasks), else ``None``.
    :param text: a synthetic text task (``TransformerPolicy``, sampling at evaluation).
    :param ranks: processes of a data-parallel run (``torchrun``, :func:`agents.data_parallel`);
        ``n_envs`` is per rank.
    """

    name: str
    env_id: str
    total_timesteps: int
    quick_timesteps: int
    n_envs: int
    ppo_kwargs: dict[str, Any] = field(hash=False)
    normalize: bool = False
    zoo_timesteps: int | None = None
    reference: str = ""
    chance: float | None = None
    text: bool = False
    ranks: int = 1


# --- classic control: rl-baselines3-zoo's PPO hyperparameters, read from the installed rl_zoo3 ------
# Every algorithm key is the zoo's (agents.training.zoo.zoo_hyperparams: its shipped hyperparams/ppo.yml, with
# lin_<v> schedules as SB3 LinearSchedules); omitted keys are SB3's defaults, as in the zoo. Only the
# budgets are ours (BUDGET_NOTE). References are the zoo's benchmark (benchmark.md): mean +/- std of
# episodic return of the trained agent.
def zoo_benchmark(env_id: str, total_timesteps: int, reference: str, quick_timesteps: int = 20_000) -> Benchmark:
    """A classic-control row with the zoo's PPO hyperparameters, ``n_envs`` and ``normalize`` for ``env_id``."""
    from agents.training.zoo import zoo_hyperparams

    ppo_kwargs = zoo_hyperparams(env_id)
    n_envs, zoo_timesteps = ppo_kwargs.pop("n_envs"), int(ppo_kwargs.pop("n_timesteps"))
    normalize = bool(ppo_kwargs.pop("normalize", False))
    ppo_kwargs.pop("policy")
    return Benchmark(env_id, env_id, total_timesteps=total_timesteps, quick_timesteps=quick_timesteps, n_envs=n_envs,
                     ppo_kwargs=ppo_kwargs, normalize=normalize, zoo_timesteps=zoo_timesteps, reference=reference)


def data_parallel_benchmark(bench: Benchmark, ranks: int) -> Benchmark:
    """``bench`` trained data-parallel over ``ranks`` processes (``<name>-<ranks>ranks``).

    Its envs and its minibatch are split over the ranks: an iteration collects the transitions of
    ``bench``'s, and each optimizer step averages the gradients of ``ranks`` minibatches that
    together hold ``bench``'s ``batch_size`` transitions.

    :raises ValueError: ``n_envs`` or ``batch_size`` does not divide by ``ranks``.
    """
    batch_size = bench.ppo_kwargs.get("batch_size", 64)  # SB3 PPO's default
    if bench.n_envs % ranks or batch_size % ranks:
        raise ValueError(f"{bench.name}'s {bench.n_envs} envs and minibatch of {batch_size} must split over {ranks} ranks")
    return dataclasses.replace(bench, name=f"{bench.name}-{ranks}ranks", n_envs=bench.n_envs // ranks, ranks=ranks,
                               ppo_kwargs={**bench.ppo_kwargs, "batch_size": batch_size // ranks})


CLASSIC = [
    zoo_benchmark("CartPole-v1", 100_000, "500.0 ± 0.0"),
    data_parallel_benchmark(zoo_benchmark("CartPole-v1", 100_000, "500.0 ± 0.0"), ranks=2),
    zoo_benchmark("Acrobot-v1", 200_000, "-73.5 ± 18.2"),
    zoo_benchmark("MountainCar-v0", 300_000, "-110.4 ± 19.5"),
    zoo_benchmark("Pendulum-v1", 100_000, "-172.2 ± 104.2"),
    # The zoo's benchmark is for LunarLander-v2; Gymnasium 1.x only has -v3 (v2 with bug fixes), so
    # the reference is indicative. Needs Box2D: pip install "gymnasium[box2d]".
    zoo_benchmark("LunarLander-v3", 200_000, "242.1 ± 31.8 (v2)"),
]


def text_benchmarks() -> list[Benchmark]:
    """The synthetic text tasks of :data:`textgym.TASKS`, with their own recommended PPO settings.

    Budgets are the tasks' ``total_timesteps`` (after which seeds 0-5 scored 0.95-1.0);
    ``--quick`` keeps the keyword task's full 6,000 steps, the shortest, and halves the others.
    """
    from agents import text_ppo_kwargs
    from textgym.tasks.synthetic import TASKS

    return [Benchmark(name, task.gym_id, total_timesteps=task.total_timesteps,
                      quick_timesteps=task.total_timesteps if name == "keyword" else task.total_timesteps // 2,
                      n_envs=4, ppo_kwargs=text_ppo_kwargs(**task.ppo_kwargs),
                      reference=f"{task.optimum:.1f} (optimum)", chance=task.chance, text=True)
            for name, task in TASKS.items()]


def box2d_available() -> bool:
    """Whether LunarLander can be built (Box2D installed)."""
    try:
        import Box2D  # noqa: F401
    except ImportError:
        return False
    return True


# --- one run: train one seed, evaluate it -------------------------------------------------------

def make_env(bench: Benchmark, seed: int, monitor_dir: str | None = None, start_index: int = 0):
    """The vectorised env of ``bench``: ``n_envs`` Monitor-wrapped copies, seeded ``seed, seed+1, ...``.

    ``start_index`` numbers the envs (and their Monitor files) from there, as SB3's ``make_vec_env``
    does: a data-parallel rank ``r`` passes ``r * n_envs``, so the ranks' files do not collide.

    With ``bench.normalize`` the VecEnv is wrapped in ``VecNormalize`` (rl-zoo's ``normalize: true``:
    observations and rewards, the reward's discount being PPO's ``gamma``). ``Monitor`` sits inside,
    so ``monitor_dir`` records raw episodic returns.
    """
    import textgym  # noqa: F401  (registers the TextGen-*-v0 ids, also in spawned workers)
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(bench.env_id, n_envs=bench.n_envs, seed=seed, monitor_dir=monitor_dir, start_index=start_index)
    if bench.normalize:
        env = VecNormalize(env, gamma=bench.ppo_kwargs.get("gamma", 0.99))
    return env


def all_benchmarks() -> dict[str, Benchmark]:
    """Every benchmark by name: classic control first, then the text tasks."""
    return {b.name: b for b in CLASSIC + text_benchmarks()}


def train_and_evaluate(name: str, seed: int, timesteps: int, out: str, n_eval_episodes: int) -> dict[str, Any]:
    """Train PPO on benchmark ``name`` for ``timesteps`` steps with ``seed``, then evaluate the final policy.

    Takes the name, not the :class:`Benchmark`, because workers are separate processes and the
    zoo's ``linear`` schedules (closures) do not pickle.

    Evaluation is SB3's ``evaluate_policy`` on fresh envs seeded ``seed + 1000``: deterministic
    actions for classic control (as rl-zoo's benchmark), sampled tokens for text (as
    ``tests/test_synthetic.py``). Under ``VecNormalize`` the eval env gets the training observation
    statistics (``sync_envs_normalization``) and keeps them frozen (``training=False``), with raw rewards.

    A data-parallel benchmark (``ranks > 1``) launches its ranks with ``torchrun`` from here
    (:func:`launch_ranks`); each rank then runs this function, wraps the model in
    :func:`agents.data_parallel` and writes its Monitor files into the one folder.

    :return: ``dict(name, seed, timesteps, score, score_std, wall_s, monitor_dir)``; ``score`` is the
        mean episodic return over ``n_eval_episodes``, ``wall_s`` the seconds of training plus evaluation.
    """
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize, sync_envs_normalization

    from agents import data_parallel

    bench = all_benchmarks()[name]
    if bench.ranks > 1 and "LOCAL_RANK" not in os.environ:
        return launch_ranks(bench, seed, timesteps, out, n_eval_episodes)
    torch.set_num_threads(1)  # small networks; one thread per worker process, workers in parallel
    start = time.perf_counter()
    monitor_dir = os.path.join(out, "monitor", bench.name, f"seed{seed}")
    env = make_env(bench, seed, monitor_dir, start_index=int(os.environ.get("RANK", 0)) * bench.n_envs)
    if bench.text:
        from agents import TransformerPolicy
        policy = TransformerPolicy
    else:
        policy = "MlpPolicy"
    # data_parallel leaves a single process's model untouched.
    model = data_parallel(PPO(policy, env, seed=seed, verbose=0, tensorboard_log=os.path.join(out, "tensorboard"),
                              **bench.ppo_kwargs))
    model.learn(total_timesteps=timesteps, tb_log_name=f"{bench.name}_seed{seed}")

    eval_env = make_env(bench, seed + 1000)
    if isinstance(eval_env, VecNormalize):
        eval_env.training, eval_env.norm_reward = False, False
        sync_envs_normalization(env, eval_env)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=n_eval_episodes, deterministic=not bench.text)
    return dict(name=bench.name, seed=seed, timesteps=timesteps, score=float(mean), score_std=float(std),
                wall_s=time.perf_counter() - start, monitor_dir=monitor_dir)


def launch_ranks(bench: Benchmark, seed: int, timesteps: int, out: str, n_eval_episodes: int) -> dict[str, Any]:
    """Run :func:`train_and_evaluate` of a data-parallel ``bench`` on ``bench.ranks`` processes under ``torchrun``.

    Every rank evaluates the same weights on the same seeded envs; rank 0 writes the result.

    :return: rank 0's result, with ``wall_s`` from launch to exit (process start-up included).
    :raises subprocess.CalledProcessError: a rank failed (``torchrun`` exits non-zero).
    """
    import subprocess
    import sys
    import tempfile

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={bench.ranks}",
                        __file__, "--rank-worker", bench.name, str(seed), str(timesteps), out, str(n_eval_episodes),
                        str(result)], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
        return {**json.loads(result.read_text()), "wall_s": time.perf_counter() - start}


def rank_worker(name: str, seed: str, timesteps: str, out: str, n_eval_episodes: str, result: str) -> None:
    """One rank of :func:`launch_ranks`: train, evaluate, and on rank 0 write the result to ``result``."""
    from agents.distributed.collectives import rank

    r = train_and_evaluate(name, int(seed), int(timesteps), out, int(n_eval_episodes))
    if rank() == 0:
        Path(result).write_text(json.dumps(r))


def run_all(jobs: Sequence[tuple[Benchmark, int, int]], out: str, workers: int, n_eval_episodes: dict[bool, int]):
    """Run every ``(benchmark, seed, timesteps)`` job in ``workers`` processes.

    Classic control first, most steps first, then the text tasks (each under a minute), so that
    the short jobs fill the end. Workers are spawned (not forked), so each imports torch afresh and
    sets one thread. Prints each run's score as it finishes.

    :return: the result dicts of :func:`train_and_evaluate`, in the order of ``jobs``.
    """
    import multiprocessing

    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][0].text, -jobs[i][2]))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(train_and_evaluate, jobs[i][0].name, jobs[i][1], jobs[i][2], out,
                               n_eval_episodes[jobs[i][0].text]): i for i in order}
        results = [None] * len(jobs)
        for future in as_completed(futures):
            r = results[futures[future]] = future.result()
            print(f"  {r['name']:<16} seed {r['seed']}: {r['score']:9.3f} ({r['wall_s']:.0f} s)", flush=True)
    return results


# --- reporting: table and learning curves --------------------------------------------------------

def random_policy_score(env_id: str, n_episodes: int = 20, seed: int = 0) -> float:
    """Mean episodic return of uniformly random actions (``action_space.sample()``), for classic control."""
    import gymnasium as gym

    env = gym.make(env_id)
    env.action_space.seed(seed)
    total = 0.0
    for episode in range(n_episodes):
        env.reset(seed=seed + episode)
        done = False
        while not done:
            _, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            total += float(reward)
            done = terminated or truncated
    return total / n_episodes


def results_table(benches: Sequence[Benchmark], results: Sequence[dict[str, Any]]) -> str:
    """Markdown table: task, steps (ours / zoo's), our mean +/- std over seeds, reference, chance, wall time.

    *ours*: mean and standard deviation over seeds of each seed's mean evaluation return.
    *chance*: the text task's exact chance level; for classic control, the measured mean return
    of uniformly random actions (20 episodes). *wall*: seconds per seed (training and evaluation,
    one worker process), mean over seeds.
    """
    lines = ["| task | steps (ours / zoo) | ours: mean ± std over seeds | seeds | reference | chance / random | wall s per seed |",
             "|---|---|---|---|---|---|---|"]
    for bench in benches:
        rows = [r for r in results if r["name"] == bench.name]
        if not rows:
            continue
        scores = np.array([r["score"] for r in rows])
        steps = f"{rows[0]['timesteps']:,}" + (f" / {bench.zoo_timesteps:,}" if bench.zoo_timesteps else "")
        chance = bench.chance if bench.text else random_policy_score(bench.env_id)
        digits = 3 if bench.text else 1
        lines.append(f"| {bench.name} | {steps} | {scores.mean():.{digits}f} ± {scores.std():.{digits}f} | {len(rows)} "
                     f"| {bench.reference} | {chance:.{digits}f} | {np.mean([r['wall_s'] for r in rows]):.0f} |")
    return "\n".join(lines)


def monitor_episodes(monitor_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Every training episode of one run from its Monitor files: (environment steps at its end, return).

    SB3's own readers: ``results_plotter.load_results`` (all ``*.monitor.csv`` files of the folder,
    ordered by the wall time of each episode's end) and ``ts2xy(..., "timesteps")`` (x = cumulative
    sum of episode lengths).
    """
    from stable_baselines3.common.results_plotter import load_results, ts2xy

    return ts2xy(load_results(monitor_dir), "timesteps")


def learning_curve(monitor_dir: str, grid: np.ndarray, window: int = 20) -> np.ndarray:
    """Training episodic return of one run on the step ``grid`` (steps).

    Moving average over ``window`` episodes (fewer when the run has under 5 * ``window`` episodes),
    placed at the step where the window's last episode ended, interpolated onto ``grid``.
    """
    x, y = monitor_episodes(monitor_dir)
    window = max(1, min(window, len(x) // 5))
    y = np.convolve(y, np.ones(window) / window, mode="valid")
    return np.interp(grid, x[window - 1:], y)


def plot_curves(benches: Sequence[Benchmark], results: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Save ``learning_curves.png`` (one panel per task) and ``curve_<task>.png`` under ``out``.

    Each panel: mean +/- std over seeds of the smoothed training return vs environment steps,
    with the reference score (dashed) and chance / random level (dotted) where known.

    :return: the written paths, the combined figure first.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = [b for b in benches if any(r["name"] == b.name for r in results)]
    cols = min(3, len(benches))
    rows = -(-len(benches) // cols)
    combined, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    paths = [out / "learning_curves.png"]
    for bench, ax in zip(benches, axes.flat):
        runs = [r for r in results if r["name"] == bench.name]
        grid = np.linspace(0, runs[0]["timesteps"], 100)
        curves = np.stack([learning_curve(r["monitor_dir"], grid) for r in runs])
        single, single_ax = plt.subplots(figsize=(5, 3.5))
        for a in (ax, single_ax):
            a.plot(grid, curves.mean(0), label=f"PPO ({len(runs)} seeds)")
            a.fill_between(grid, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0), alpha=0.3)
            reference = float(bench.reference.split()[0])
            a.axhline(reference, ls="--", c="k", lw=1, label="optimum" if bench.text else "rl-zoo")
            if bench.chance is not None:
                a.axhline(bench.chance, ls=":", c="gray", lw=1, label="chance")
            a.set(title=bench.name, xlabel="environment steps", ylabel="episodic return (train)")
            a.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
            a.legend(fontsize=7, loc="lower right")
        single.tight_layout()
        paths.append(out / f"curve_{bench.name}.png")
        single.savefig(paths[-1], dpi=80)
        plt.close(single)
    for ax in list(axes.flat)[len(benches):]:
        ax.axis("off")
    combined.tight_layout()
    combined.savefig(paths[0], dpi=72)
    plt.close(combined)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short budgets (each task's quick_timesteps); default tasks CartPole-v1 and keyword, seeds 0 1")
    parser.add_argument("--seeds", type=int, nargs="+", help="PPO seeds (default: 0 1 2; --quick: 0 1)")
    parser.add_argument("--tasks", nargs="+", help="subset of task names (default: all; --quick: CartPole-v1 keyword)")
    parser.add_argument("--out", default="runs/compare_baselines", help="output directory")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--rank-worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_worker:
        rank_worker(*args.rank_worker)
        return

    by_name = all_benchmarks()
    benches = list(by_name.values())
    if args.tasks:
        unknown = sorted(set(args.tasks) - set(by_name))
        if unknown:
            parser.error(f"unknown task(s) {unknown}; choose from {sorted(by_name)}")
        benches = [b for b in benches if b.name in args.tasks]
    elif args.quick:
        benches = [by_name["CartPole-v1"], by_name["keyword"]]
    if not box2d_available() and any(b.name.startswith("LunarLander") for b in benches):
        print('LunarLander-v3 left out: Box2D is not installed (pip install "gymnasium[box2d]").')
        benches = [b for b in benches if not b.name.startswith("LunarLander")]
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    jobs = [(b, seed, b.quick_timesteps if args.quick else b.total_timesteps) for b in benches for seed in seeds]
    print(f"{len(jobs)} runs ({len(benches)} tasks x {len(seeds)} seeds) in {args.workers} processes; "
          f"logs under {out}/", flush=True)
    results = run_all(jobs, str(out), args.workers, n_eval_episodes={False: 10, True: 40})
    table = results_table(benches, results)
    paths = plot_curves(benches, results, out)
    wall = time.perf_counter() - start

    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(dict(wall_s=wall, quick=args.quick, results=results), indent=1))
    print()
    print(table)
    print(f"\nClassic-control hyperparameters: {ZOO_SOURCE}. {BUDGET_NOTE}")
    print(f"Total wall time {wall:.0f} s ({wall / 60:.1f} min). Plots: {', '.join(str(p) for p in paths[:1])} "
          f"(+{len(paths) - 1} per task); TensorBoard: tensorboard --logdir {out / 'tensorboard'}")


if __name__ == "__main__":
    main()
