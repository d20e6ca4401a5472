"""The main job's update settings at equal training wall time: held-out gain per setting. Prints a markdown table.

    python benchmarks/update_settings.py                       # every setting, seeds 0 1 2, 350 s each (~4.5 h on 2 cores)
    python benchmarks/update_settings.py --settings ppo-4-epochs ppo-1-epoch --seeds 0 --train-seconds 120

Issue 24 asks which of PPO's update settings reaches the best held-out reward for the time it
takes: fewer epochs per rollout (SB3's ``n_epochs``) or larger minibatches (``batch_size``) make
each update cheaper, so more rollouts fit in the same wall time, each learning less. Every
setting trains the main job (``benchmarks/compare_algorithms.py``'s work: SmolLM2-135M-Instruct,
movie-review prompts, the default reward model, 8 envs x 32 steps, 16 new tokens, adaptive KL
penalty) for the same ``--train-seconds``, rollout by rollout, and stops at the first rollout
past the budget. The default budget, 350 s, is what today's default takes for its 6,144 tokens
on 2 cores. Each run also evaluates at half the budget (``--curve-episodes`` held-out episodes),
so the table answers "which setting reaches the default's gain in half its time" as well.

Each (setting, seed) is one ``compare_algorithms.py`` run in a fresh subprocess; results go to
``--out`` as ``<setting>_seed<K>.json`` and a run whose JSON exists is not repeated. The timed
runs must have the machine to themselves: on 2 cores a second busy process slows torch several
times, and the settings would be compared at different speeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare_algorithms  # noqa: E402

SETTINGS: dict[str, list[str]] = {
    "ppo-4-epochs": ["--variants", "ppo"],
    "ppo-2-epochs": ["--variants", "ppo", "--n-epochs", "2"],
    "ppo-1-epoch": ["--variants", "ppo", "--n-epochs", "1"],
    "ppo-minibatch-64": ["--variants", "ppo", "--batch-size", "64"],
    "ppo-minibatch-256": ["--variants", "ppo", "--batch-size", "256"],
    "ppo-bfloat16": ["--variants", "ppo", "--dtype", "bfloat16"],
    "ppo-minibatch-64-bfloat16": ["--variants", "ppo", "--batch-size", "64", "--dtype", "bfloat16"],
    "rloo-1-epoch": ["--variants", "rloo", "--n-epochs", "1"],
    "grpo-1-epoch": ["--variants", "grpo", "--n-epochs", "1"],
}
"""Setting name -> its ``compare_algorithms.py`` arguments. ``ppo-4-epochs`` is today's default
(:func:`agents.text_ppo_kwargs`: 4 epochs, minibatches of at least 128 transitions, float32);
a minibatch of 256 is the whole rollout, one optimizer step per epoch; ``ppo-minibatch-64-bfloat16``
combines the two settings that came closest to beating the default on their own."""

DEFAULT_SETTING = "ppo-4-epochs"
"""The setting the others are paired with: today's :func:`agents.text_ppo_kwargs`."""


def table(runs: list[dict]) -> str:
    """Markdown table, one row per setting: ``compare_algorithms.summary_rows``' gain at the budget,
    plus the timesteps each setting fits in it, its gain at half the budget (the curve point's
    held-out reward less the same episodes' reference at second 0, mean over seeds, ± s.e.) and
    :func:`paired_difference` against :data:`DEFAULT_SETTING`."""
    import numpy as np

    lines = ["| setting | seeds | timesteps in the budget | gain at half the budget (± s.e.) "
             f"| gain at the budget (± s.e.) | trained reward vs {DEFAULT_SETTING}, same seeds (± s.e.) "
             "| KL to reference (nats/episode) | train s: rollout / update | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in compare_algorithms.summary_rows(runs):
        group = [r for r in runs if r["variant"] == row["variant"]]
        half = np.array([r["curve"][1]["mean"] - r["curve"][0]["mean"] for r in group])
        half_sem = np.sqrt(sum(r["curve"][i]["sem"] ** 2 for r in group for i in (0, 1))) / len(group)
        paired = paired_difference(runs, row["variant"])
        paired_cell = "-" if paired is None else f"{paired[0]:+.3f} ± {paired[1]:.3f} ({paired[2]} seeds)"
        lines.append(f"| {row['variant']} | {row['seeds']} | {np.mean([r['timesteps'] for r in group]):,.0f} "
                     f"| {half.mean():+.3f} ± {half_sem:.3f} | {row['gain']:+.3f} ± {row['gain_sem']:.3f} "
                     f"| {paired_cell} | {row['kl']:.2f} | {row['train']:.0f}: {row['rollout']:.0f} / {row['update']:.0f} "
                     f"| {row['rss']:,.0f} |")
    return "\n".join(lines)


def paired_difference(runs: list[dict], setting: str) -> tuple[float, float, int] | None:
    """``setting``'s held-out trained reward less :data:`DEFAULT_SETTING`'s, over the seeds both ran.

    Settings that ran different seeds are not comparable through their pooled gains alone (one weak
    seed moves a 2-seed mean by half its shortfall), so this pairs them by seed. The ± is the
    evaluation's standard error of the mean difference (each run's 256-episode s.e., combined);
    it leaves out how much training itself varies between seeds, which 2-3 seeds cannot estimate.

    :return: ``(mean difference, its s.e., seeds)``, or ``None`` for the default itself or when
        no seed is shared.
    """
    import numpy as np

    if setting == DEFAULT_SETTING:
        return None
    default = {r["seed"]: r for r in runs if r["variant"] == DEFAULT_SETTING}
    pairs = [(r, default[r["seed"]]) for r in runs if r["variant"] == setting and r["seed"] in default]
    if not pairs:
        return None
    diff = np.mean([a["trained_reward"] - b["trained_reward"] for a, b in pairs])
    sem = np.sqrt(sum(a["trained_sem"] ** 2 + b["trained_sem"] ** 2 for a, b in pairs)) / len(pairs)
    return float(diff), float(sem), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--train-seconds", type=float, default=350.0, help="training wall time per run")
    parser.add_argument("--eval-episodes", type=int, default=256, help="held-out episodes per policy at the end")
    parser.add_argument("--curve-episodes", type=int, default=128, help="held-out episodes at half the budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/update_settings")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        for name in args.settings:
            run_args = compare_algorithms.parse_args(compare_algorithms.build_parser(), [
                *SETTINGS[name], "--label", name, "--train-seconds", str(args.train_seconds),
                "--eval-episodes", str(args.eval_episodes), "--curve-episodes", str(args.curve_episodes),
                "--threads", str(args.threads)])
            runs.append(compare_algorithms.run_one(run_args, run_args.variants[0], seed, out / f"{name}_seed{seed}.json"))
    print(table(runs))


if __name__ == "__main__":
    main()
