"""On-policy algorithms compared on the main job's work. Prints a markdown table, saves a PNG.

The work is ``examples/train_sentiment.py``'s: SmolLM2-135M-Instruct continuing movie-review
prompts (training split), the default reward model, 8 envs, 16 new tokens, 6,144 generated tokens,
learning rate 1e-5, and the adaptive KL penalty (initial beta 0.05, target 4 nats per episode).
Variants (``--variants``):

- ``ppo``: today's default, PPO with a critic and GAE (:func:`agents.text_ppo_kwargs`);
- ``rloo``, ``grpo``: critic-free PPO with group-relative advantages, 2 groups of 4 envs sharing
  prompts (:func:`agents.group_ppo_kwargs`, :class:`textgym.vec_env.GroupedPrompts`);
- ``nlpo``: NLPO (Ramamurthy et al. 2023) on sb3-contrib's ``MaskablePPO``: top-p 0.9 of a masking
  policy refreshed every 20 rollouts (:func:`agents.nlpo_kwargs`, :class:`agents.NLPOCallback`);
- ``a2c``: SB3's A2C (one gradient step per rollout, Adam, the same buffer and value head);
- ``trpo``: sb3-contrib's TRPO as :class:`agents.algorithms.trpo.TransformerTRPO` (actor gradients in one
  backward pass), 5 conjugate-gradient steps and 4 critic epochs: each Hessian-vector product
  differentiates the KL twice through the LM.

The PPO-family variants (``ppo``, ``rloo``, ``grpo``, ``nlpo``) take the update's settings
``--n-epochs``, ``--batch-size`` and ``--dtype``; ``--train-seconds`` trains for a wall-time
budget (whole rollouts, stopping at the first past it) instead of ``--timesteps``, and
``--label`` names such a run (``benchmarks/update_settings.py`` compares settings that way).

Each (variant, seed) runs in a fresh subprocess, so peak RSS (``ru_maxrss``, taken when training
ends, before the final evaluation) is its own. Training runs in ``--curve-points`` chunks of
``model.learn(..., reset_num_timesteps=False)``; only those calls are timed (split into rollout,
``collect_rollouts``, and update: the KL reference pass plus the algorithm's ``train``). Between
chunks, the policy samples ``--curve-episodes`` held-out episodes (test split, same prompts at
every point, KV-cached sampling in waves, :func:`agents.training.evaluation.sample_episodes`) for the
reward-against-wall-time curve. At the end
:func:`agents.evaluate_against_reference` gives the held-out reward gain, KL to the reference and
perplexity under it (``--eval-episodes`` per policy; the reference's figures are pooled over all
runs, see :func:`summary_rows`). Critic variants also record SB3's
``train/explained_variance`` per update. Results go to ``--out`` as one JSON per run (a run
whose JSON exists is not repeated, so an interrupted comparison resumes)::

    python benchmarks/compare_algorithms.py                        # ppo rloo grpo nlpo a2c, seeds 0 1: ~100 min on 2 cores
    python benchmarks/compare_algorithms.py --variants ppo grpo --seeds 0 --timesteps 1536
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("ppo", "rloo", "grpo", "nlpo", "a2c", "trpo")
PPO_FAMILY = ("ppo", "rloo", "grpo", "nlpo")
"""The variants that run PPO's update, to which ``--n-epochs``, ``--batch-size`` and ``--dtype`` apply."""
GROUP_SIZE = 4


def build_model(variant: str, args: argparse.Namespace, seed: int):
    """The algorithm of ``variant`` on the main job's training envs."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import A2C, PPO
    from stable_baselines3.common.env_util import make_vec_env

    from agents import EpisodeRolloutBuffer, MaskableTransformerPolicy, TransformerPolicy, group_ppo_kwargs, nlpo_kwargs
    from agents.algorithms.trpo import TransformerTRPO
    from textgym.vec_env import GroupedPrompts

    env = make_vec_env("TextGen-v0", n_envs=args.n_envs, seed=seed, env_kwargs=dict(max_new_tokens=args.max_new_tokens))
    common = dict(learning_rate=args.learning_rate, n_steps=args.n_steps)
    if variant in PPO_FAMILY:
        common.update(update_settings(args))
    if variant == "ppo":
        return ppo_with_critic_options(env, args, seed, common)
    if variant == "nlpo":
        return MaskablePPO(MaskableTransformerPolicy, env, seed=seed, **nlpo_kwargs(**common))
    if variant in ("rloo", "grpo"):
        return PPO(TransformerPolicy, GroupedPrompts(env, GROUP_SIZE), seed=seed, **group_ppo_kwargs(variant, **common))
    text = dict(gamma=1.0, rollout_buffer_class=EpisodeRolloutBuffer, policy_kwargs=dict(value_learning_rate=1e-4))
    if variant == "a2c":
        return A2C(TransformerPolicy, env, seed=seed, gae_lambda=0.95, vf_coef=0.1, ent_coef=0.0, max_grad_norm=1.0,
                   use_rms_prop=False, **common, **text)
    if variant == "trpo":
        # 5 conjugate-gradient steps (sb3-contrib: 15) and 4 critic epochs (10; PPO's n_epochs is 4):
        # each Hessian-vector product differentiates twice through all 135M weights.
        return TransformerTRPO(TransformerPolicy, env, seed=seed, batch_size=128, target_kl=0.05, cg_max_steps=5,
                               n_critic_updates=4, **common, **text)
    raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")


def update_settings(args: argparse.Namespace) -> dict:
    """The PPO family's update options that were set (``--n-epochs``, ``--batch-size``, ``--dtype``),
    as overrides of :func:`agents.text_ppo_kwargs`; the unset ones keep its defaults."""
    settings = {k: getattr(args, k) for k in ("n_epochs", "batch_size") if getattr(args, k) is not None}
    if args.dtype != "float32":
        settings["policy_kwargs"] = dict(dtype=args.dtype)
    return settings


def ppo_with_critic_options(env, args: argparse.Namespace, seed: int, common: dict):
    """The ppo variant with the critic experiments' options: ``--value-learning-rate``,
    ``--value-warmup`` (the LM's learning rate is 0 for that many first updates, while the value
    head learns at its own rate) and ``--normalize-returns`` (SB3's ``VecNormalize`` scales the
    env's rewards by the running standard deviation of the return, ``gamma=1``)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import VecNormalize

    from agents import TransformerPolicy, text_ppo_kwargs

    if args.normalize_returns:
        env = VecNormalize(env, norm_obs=False, norm_reward=True, gamma=1.0)
    holder: dict = {}
    if args.value_warmup:
        warmup_steps = args.value_warmup * args.n_envs * args.n_steps
        # SB3 also calls the schedule while building the policy, before the model exists.
        common = {**common, "learning_rate": lambda _: 0.0 if "model" not in holder
                  or holder["model"].num_timesteps <= warmup_steps else args.learning_rate}
    policy_kwargs = {**common.pop("policy_kwargs", {}), "value_learning_rate": args.value_learning_rate}
    holder["model"] = PPO(TransformerPolicy, env, seed=seed, **text_ppo_kwargs(**common, policy_kwargs=policy_kwargs))
    return holder["model"]


def worker(args: argparse.Namespace) -> dict:
    """One (variant, seed) in this process: train in chunks, evaluate; return the figures (JSON-able)."""
    import numpy as np
    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401  (registers TextGen-v0)
    from agents import AdaptiveKLController, KLPenaltyCallback, NLPOCallback, evaluate_against_reference
    from agents.training.evaluation import sample_episodes

    class Clock(BaseCallback):
        """Seconds spent in rollouts, and SB3's explained variance of each update."""

        def __init__(self):
            super().__init__()
            self.rollout_seconds, self.explained_variance, self._start = 0.0, [], 0.0

        def _on_rollout_start(self) -> None:
            self._start = time.perf_counter()
            self._record_explained_variance()

        def _on_rollout_end(self) -> None:
            self.rollout_seconds += time.perf_counter() - self._start

        def _record_explained_variance(self) -> None:
            # The last update's figures stay in the logger until the next iteration dumps them.
            value = self.logger.name_to_value.get("train/explained_variance")
            if value is not None and (not self.explained_variance or self.explained_variance[-1][0] != self.num_timesteps):
                self.explained_variance.append((self.num_timesteps, float(value)))

        def _on_step(self) -> bool:
            return True

    torch.set_num_threads(args.threads)
    seed = args.seed
    model = build_model(args.variant, args, seed)
    kl = KLPenaltyCallback(AdaptiveKLController(args.kl_coef, target=args.kl_target))
    clock = Clock()
    callbacks = [kl, clock] + ([NLPOCallback()] if args.variant == "nlpo" else [])
    learn_kwargs = dict(use_masking=False) if args.variant == "nlpo" else {}  # TextGen-v0 has no action_masks()
    held_out = make_vec_env("TextGen-v0", n_envs=args.n_envs,
                            env_kwargs=dict(max_new_tokens=args.max_new_tokens, prompts="movie_reviews:test"))

    def curve_point() -> dict:
        held_out.seed(20_000 + seed)
        torch.manual_seed(20_000 + seed)
        rewards = [e["reward"] for e in sample_episodes(model.policy, held_out, args.curve_episodes)]
        return dict(steps=int(model.num_timesteps), mean=float(np.mean(rewards)),
                    sem=float(np.std(rewards, ddof=1) / np.sqrt(len(rewards))))

    curve = [dict(seconds=0.0, **curve_point())]
    train_seconds = 0.0
    for point in range(1, args.curve_points + 1):
        while True:
            start = time.perf_counter()
            model.learn(chunk_timesteps(args), reset_num_timesteps=False, callback=callbacks, **learn_kwargs)
            train_seconds += time.perf_counter() - start
            if point_reached(args, point, train_seconds):
                break
        clock._record_explained_variance()
        curve.append(dict(seconds=train_seconds, **curve_point()))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    torch.manual_seed(10_000 + seed)  # the same reference samples for every variant of a seed
    results = evaluate_against_reference(model, held_out, n_episodes=args.eval_episodes, seed=10_000 + seed,
                                         kv_cache=True, verbose=False)
    reference, trained = results["reference"], results["trained"]
    return dict(
        variant=args.label or args.variant, algorithm=args.variant, seed=seed, timesteps=int(model.num_timesteps),
        train_seconds=train_seconds, rollout_seconds=clock.rollout_seconds,
        update_seconds=train_seconds - clock.rollout_seconds, peak_rss_mib=peak_rss,
        reference_reward=reference.reward_mean, reference_sem=reference.reward_sem,
        trained_reward=trained.reward_mean, trained_sem=trained.reward_sem,
        kl=trained.kl_mean, kl_sem=trained.kl_sem, perplexity=trained.perplexity,
        reference_perplexity=reference.perplexity, last_kl_coef=kl.stats.get("kl/coef"),
        last_rollout_kl=kl.stats.get("kl/episode_kl"), curve=curve,
        explained_variance=clock.explained_variance if getattr(model.policy, "critic", True) else [],
    )


def chunk_timesteps(args: argparse.Namespace) -> int:
    """Timesteps per ``model.learn`` call: a curve point's share of ``--timesteps``, or, with
    ``--train-seconds``, one rollout (so that a run stops at the first rollout past its budget)."""
    return args.n_envs * args.n_steps if args.train_seconds is not None else args.timesteps // args.curve_points


def point_reached(args: argparse.Namespace, point: int, train_seconds: float) -> bool:
    """Whether training has reached curve point ``point`` of ``args.curve_points``: always after
    one chunk of ``--timesteps``; with ``--train-seconds``, once that fraction of the budget is spent
    (the last update may run past it: runs record the seconds they took)."""
    return args.train_seconds is None or train_seconds >= args.train_seconds * point / args.curve_points


def summary_rows(runs: list[dict]) -> list[dict]:
    """Per variant, over seeds: the held-out gain ± s.e. and the other figures.

    Every run also samples the reference (the same pretrained policy on the same held-out prompts),
    so the reference's mean is pooled over all runs: the gain of a variant is its mean trained
    reward over seeds less that pooled mean, and its s.e. combines the two means' s.e.
    """
    import numpy as np

    ref_means = np.array([r["reference_reward"] for r in runs])
    ref_sem = float(np.sqrt(np.sum(np.square([r["reference_sem"] for r in runs]))) / len(runs))
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in runs):
        group = [r for r in runs if r["variant"] == variant]
        trained = float(np.mean([r["trained_reward"] for r in group]))
        trained_sem = float(np.sqrt(np.sum(np.square([r["trained_sem"] for r in group]))) / len(group))
        ev = [v for r in group for _, v in r["explained_variance"][-4:]]
        rows.append(dict(
            variant=variant, seeds=len(group), gain=trained - float(ref_means.mean()),
            gain_sem=float(np.hypot(trained_sem, ref_sem)), trained=trained,
            kl=float(np.mean([r["kl"] for r in group])),
            perplexity=float(np.mean([r["perplexity"] for r in group])),
            reference_perplexity=float(np.mean([r["reference_perplexity"] for r in runs])),
            train=float(np.mean([r["train_seconds"] for r in group])),
            rollout=float(np.mean([r["rollout_seconds"] for r in group])),
            update=float(np.mean([r["update_seconds"] for r in group])),
            rss=float(max(r["peak_rss_mib"] for r in group)),
            explained_variance=float(np.mean(ev)) if ev else None,
            curve=[float(np.mean([r["curve"][i]["mean"] for r in group])) for i in range(len(group[0]["curve"]))],
        ))
    return rows


def markdown(rows: list[dict]) -> str:
    """The comparison table (markdown)."""
    lines = ["| variant | seeds | held-out reward gain (± s.e.) | trained reward | KL to reference (nats/episode) "
             "| perplexity under reference (reference's own) | train wall time (s): rollout / update | peak RSS (MiB) "
             "| explained variance (last 4 updates) | curve: held-out reward at each evaluation |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ev = "-" if r["explained_variance"] is None else f"{r['explained_variance']:.2f}"
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['gain']:+.3f} ± {r['gain_sem']:.3f} | {r['trained']:+.3f} "
                     f"| {r['kl']:.2f} | {r['perplexity']:.1f} ({r['reference_perplexity']:.1f}) "
                     f"| {r['train']:.0f}: {r['rollout']:.0f} / {r['update']:.0f} | {r['rss']:,.0f} | {ev} "
                     f"| {' → '.join(f'{m:+.2f}' for m in r['curve'])} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """Held-out reward (mean of the curve episodes) against training wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["variant"] for r in runs))}
    for run in runs:
        seconds = [p["seconds"] for p in run["curve"]]
        mean = [p["mean"] for p in run["curve"]]
        ax.plot(seconds, mean, marker="o", color=colors[run["variant"]], alpha=0.85,
                linestyle="-" if run["seed"] == 0 else "--", label=f"{run['variant']} seed {run['seed']}")
    ax.set_xlabel("training wall time (s, 2 CPU cores; evaluation excluded)")
    ax.set_ylabel("held-out reward (mean over episodes)")
    ax.set_title("Main job: SmolLM2-135M, movie-review continuations, KL-penalised")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_one(args: argparse.Namespace, variant: str, seed: int, path: Path) -> dict:
    """Run (variant, seed) in a subprocess unless ``path`` already holds its result."""
    if path.exists():
        return json.loads(path.read_text())
    command = [sys.executable, __file__, "--worker", "--variant", variant, "--seed", str(seed),
               *(f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                 for k, v in vars(args).items()
                 if k not in ("worker", "variant", "seed", "variants", "seeds", "out") and v is not False and v is not None)]
    print(f"running {variant} seed {seed} ...", flush=True)
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    path.write_text(json.dumps(result, indent=1))
    return result


def build_parser() -> argparse.ArgumentParser:
    """This script's command line (``benchmarks/update_settings.py`` builds its runs with it too)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["ppo", "rloo", "grpo", "nlpo", "a2c"], choices=VARIANTS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--timesteps", type=int, default=6144)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--n-steps", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--value-learning-rate", type=float, default=1e-4,
                        help="ppo variant: the value head's learning rate (text_ppo_kwargs' default 1e-4)")
    parser.add_argument("--value-warmup", type=int, default=0,
                        help="ppo variant: updates at the start during which only the value head learns")
    parser.add_argument("--normalize-returns", action="store_true",
                        help="ppo variant: VecNormalize(norm_obs=False, norm_reward=True, gamma=1) on the training envs")
    parser.add_argument("--n-epochs", type=int, default=None,
                        help="PPO-family variants: epochs per rollout (text_ppo_kwargs' default 4)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="PPO-family variants: transitions per minibatch (text_ppo_kwargs' default 128)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="PPO-family variants: the LM's (and the KL reference's) precision")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="train for this many seconds (whole rollouts) instead of --timesteps: "
                             "variants compared at equal wall time")
    parser.add_argument("--label", default=None, help="the runs' name in the table and their files' (default: the variant)")
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--kl-target", type=float, default=4.0)
    parser.add_argument("--curve-points", type=int, default=2, help="evaluations during training (after each chunk)")
    parser.add_argument("--curve-episodes", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/compare_algorithms")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser``'s arguments, with the errors of combinations that would run something else than asked."""
    args = parser.parse_args(argv)
    options = [f"--{k.replace('_', '-')}" for k in ("n_epochs", "batch_size") if getattr(args, k) is not None]
    options += ["--dtype"] if args.dtype != "float32" else []
    others = sorted(set(args.variants if not args.worker else [args.variant]) - set(PPO_FAMILY))
    if args.label and len(args.variants) > 1 and not args.worker:
        parser.error(f"--label names one variant's runs; got --variants {' '.join(args.variants)}")
    if options and others:
        parser.error(f"{', '.join(options)} apply to the PPO-family variants {PPO_FAMILY}, not to {others}: "
                     "run those variants separately")
    return args


def main() -> None:
    args = parse_args(build_parser())
    if args.worker:
        print(json.dumps(worker(args)))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [run_one(args, v, s, out / f"{args.label or v}_seed{s}.json") for s in args.seeds for v in args.variants]
    print(markdown(summary_rows(runs)))
    plot(runs, out / "reward_vs_wall_time.png")
    print(f"\nplot: {out / 'reward_vs_wall_time.png'}")


if __name__ == "__main__":
    main()
