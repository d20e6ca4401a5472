"""The three demos over seeds: held-out gain, KL and wall time as mean ± standard deviation across seeds.

    python benchmarks/demo_seeds.py                                   # every demo, seeds 0 1 2 (~2 h on 2 cores)
    python benchmarks/demo_seeds.py --demos sentiment --seeds 0 1 2 3
    python benchmarks/demo_seeds.py --demos textarena --out benchmarks/results/demos_kl -- --kl-target 2

Each run is ``python examples/train_<demo>.py --seed K --results-json ...`` with the demo's
defaults (plus the arguments after ``--``), one at a time: every demo uses both cores of a 2-core
machine, so runs side by side would slow each other and their wall times would mean nothing.
A run whose JSON already exists is not repeated, so an interrupted sweep continues where it
stopped (``--force`` reruns). Results go to ``benchmarks/results/demos/<demo>_seed<K>.json``;
``docs/generate_results.py`` turns them into the docs' table, and this script prints the same table.

Per demo, the headline figure is the held-out one its script checks: mean reward-model score
(sentiment), accuracy (reasoning: the ``correct`` component) and game reward (TextArena).
*gain* is trained minus reference on the same held-out episodes of each seed; the table gives its
mean and standard deviation across seeds (the spread a new seed would show), next to the mean of
the per-run standard errors (the noise of one evaluation).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results" / "demos"
DEMOS = ("sentiment", "reasoning", "textarena")
HEADLINE = {"sentiment": ("reward_mean", "held-out reward"), "reasoning": ("correct", "held-out accuracy"),
            "textarena": ("reward_mean", "game reward")}
"""Demo -> (the figure: a TextEvaluation field or a reward component, its label)."""


def headline(demo: str, evaluation: dict) -> tuple[float, float]:
    """``(mean, standard error)`` of ``demo``'s headline figure in one evaluation summary."""
    key = HEADLINE[demo][0]
    if key in evaluation["components"]:
        return tuple(evaluation["components"][key])
    return evaluation[key], evaluation["reward_sem"]


def run(demo: str, seed: int, out: Path, extra: list[str], force: bool) -> dict:
    """One demo run (or the JSON of an earlier one); its summary."""
    path = out / f"{demo}_seed{seed}.json"
    if force or not path.exists():
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "examples" / f"train_{demo}.py"), "--seed", str(seed),
                   "--results-json", str(path), "--tensorboard-log", str(out / "runs"), *extra]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(path.read_text())


def mean_std(values: np.ndarray, sign: str = "", digits: int = 3) -> str:
    """``"mean ± std"`` over seeds (sample standard deviation; 0 for one seed)."""
    std = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():{sign}.{digits}f} ± {std:.{digits}f}"


def figures(demo: str, group: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run of ``group``: the reference's and the trained policy's headline ``(mean, s.e.)``,
    each ``(n_runs, 2)``, and the trained policy's KL to the reference ``(n_runs,)``."""
    before, after = (np.array([headline(demo, r[name]) for r in group]) for name in ("reference", "trained"))
    return before, after, np.array([r["trained"]["kl_mean"] for r in group])


def table(runs: list[dict]) -> str:
    """Markdown table, one row per demo in ``runs`` (the summaries ``write_summary`` wrote)."""
    lines = ["| demo | figure | seeds | reference | trained | gain: mean ± std over seeds | s.e. of one run "
             "| KL to reference (nats/episode) | train s | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for demo in DEMOS:
        group = sorted((r for r in runs if r["demo"] == demo), key=lambda r: r["seed"])
        if not group:
            continue
        before, after, kl = figures(demo, group)
        lines.append(f"| {demo} | {HEADLINE[demo][1]} | {', '.join(str(r['seed']) for r in group)} "
                     f"| {before[:, 0].mean():+.3f} | {after[:, 0].mean():+.3f} "
                     f"| **{mean_std(after[:, 0] - before[:, 0], '+')}** "
                     f"| {np.hypot(before[:, 1], after[:, 1]).mean():.3f} | {mean_std(kl)} "
                     f"| {np.mean([r['train_seconds'] for r in group]):.0f} "
                     f"| {np.mean([r['wall_seconds'] for r in group]):.0f} |")
    return "\n".join(lines) + "\n"


def variants_table(demo: str, variants: list[tuple[str, list[dict]]], components: tuple[str, ...] = ()) -> str:
    """Markdown table comparing settings of one demo, one row per ``(label, runs)`` in ``variants``.

    Per setting: the seeds, the headline figure's reference and trained means and its gain (mean ±
    std across seeds), the trained policy's ``components`` (mean across seeds), its KL to the
    reference and the KL coefficient beta after the last rollout (mean ± std across seeds), and
    the training seconds. Seeds a setting shares with another are the same training prompts and
    held-out episodes, so their gains pair up.
    """
    lines = ["| setting | seeds | reference | trained | gain: mean ± std over seeds | "
             + "".join(f"trained {name} | " for name in components)
             + "KL to reference (nats/episode) | beta after the last rollout | train s |",
             "|---|---|---|---|---|" + "---|" * len(components) + "---|---|---|"]
    for label, group in variants:
        if not group:
            continue
        group = sorted(group, key=lambda r: r["seed"])
        before, after, kl = figures(demo, group)
        before, after = before[:, 0], after[:, 0]
        parts = "".join(f"{np.mean([r['trained']['components'][name][0] for r in group]):.3f} | "
                        for name in components)
        beta = np.array([r["last_rollout"]["kl/coef"] for r in group])
        lines.append(f"| {label} | {', '.join(str(r['seed']) for r in group)} | {before.mean():+.3f} "
                     f"| {after.mean():+.3f} | **{mean_std(after - before, '+')}** | {parts}{mean_std(kl)} "
                     f"| {mean_std(beta, digits=4)} | {np.mean([r['train_seconds'] for r in group]):.0f} |")
    return "\n".join(lines) + "\n"


def load(out: Path = RESULTS) -> list[dict]:
    """Every run summary under ``out``."""
    return [json.loads(path.read_text()) for path in sorted(out.glob("*_seed*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demos", nargs="+", choices=DEMOS, default=list(DEMOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the run JSONs")
    parser.add_argument("--force", action="store_true", help="rerun seeds whose JSON exists")
    parser.add_argument("extra", nargs="*", help="arguments passed to every demo (after --)")
    args = parser.parse_args()
    for demo in args.demos:
        for seed in args.seeds:
            run(demo, seed, args.out, args.extra, args.force)
    print()
    print(table(load(args.out)))


if __name__ == "__main__":
    main()
