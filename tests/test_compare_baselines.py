"""examples/compare_baselines.py: quick mode learns (CartPole-v1, keyword task) and writes its table, plots and logs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TEST_SEED
from textgym.tasks.synthetic import TASKS

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare_baselines.py"

CARTPOLE_RANDOM = 22.0
"""Mean CartPole-v1 return of uniformly random actions (about 22; the script measures it, column 'chance / random')."""

CARTPOLE_MIN = 100.0
"""Every quick-run CartPole-v1 seed must reach this, both in evaluation and in its last training episodes.

4.5x the random policy. With the zoo's hyperparameters and the quick budget (2e4 steps, a fifth of
the zoo's), seeds 0/1 scored 424.2/157.1 in evaluation (10 deterministic episodes) and 227.7/148.0
over their last 20 training episodes (sampled actions) on the development machine. Both are checked
because deterministic CartPole can be lucky: after a single rollout (256 steps) seed 0 already
scored 418.1 in evaluation, but 17.1 in training episodes (seed 1: 9.4 and 20.3).
"""

LAST_EPISODES = 20
"""Training episodes at the end of each run whose mean return (Monitor files) is checked."""

MIN_GAP_CLOSED = 0.5
"""The keyword task must close half the chance-to-optimum gap (threshold 0.543), every seed, both figures.

Measured over seeds 0-39 with the quick budget (6,000 steps, the task's recommended one; one process
per seed, one thread): 39 seeds scored >= 0.994 in evaluation (40 sampled episodes) and >= 0.988 over
their last 20 training episodes. Seed 18 plateaus near 0.88 from step 3,000 on (evaluation 0.906,
last 20 training episodes 0.812, last 100 0.855): a stuck seed that has still closed 78% of the gap.
So the bar is set well under that plateau rather than at tests/test_synthetic.py's 80%, which seed
18 misses on its noisy last-20 figure (it failed CI's learning run with ``TEXTGYM_TEST_SEED=17``).
Chance is 0.086; after a single rollout (128 steps) seeds 0/1 scored 0.119/0.100.
"""


def load_script():
    """The script as a module (``examples/`` is not a package)."""
    spec = importlib.util.spec_from_file_location("compare_baselines", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_quick(out: Path, seed: int, tasks: list[str] | None = None):
    """``python examples/compare_baselines.py --quick`` with seeds ``seed`` and ``seed + 1``: (out dir, stdout, results.json)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TEXTGYM_CACHE": str(out / "textgym_cache")}
    command = [sys.executable, str(SCRIPT), "--quick", "--seeds", str(seed), str(seed + 1), "--out", str(out)]
    proc = subprocess.run(command + (["--tasks", *tasks] if tasks else []), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc.stdout, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the quick mode once (CartPole-v1 and keyword, seeds ``TEST_SEED`` and the next)."""
    return run_quick(tmp_path_factory.mktemp("compare_baselines"), TEST_SEED)


def scores(results: dict, name: str) -> dict[int, float]:
    return {r["seed"]: r["score"] for r in results["results"] if r["name"] == name}


def last_training_return(out: Path, name: str, seed: int) -> float:
    """Mean return of the run's last LAST_EPISODES training episodes, from its Monitor files."""
    _, returns = load_script().monitor_episodes(str(out / "monitor" / name / f"seed{seed}"))
    return float(np.mean(returns[-LAST_EPISODES:]))


def lowest_figures(run, name: str, seed: int) -> tuple[dict[int, float], dict[int, float]]:
    """Evaluation scores and last-training-episode returns of ``name``'s two seeds (``seed`` and the next)."""
    out, _, results = run
    evaluation = scores(results, name)
    assert sorted(evaluation) == [seed, seed + 1]
    return evaluation, {s: last_training_return(out, name, s) for s in evaluation}


def assert_every_seed_reaches(quick_run, record_property, name: str, threshold: float, baseline: str) -> None:
    """Both seeds of ``name`` (``TEST_SEED`` and the next) reach ``threshold`` both in evaluation and over
    their last training episodes; records the lowest of the four figures."""
    evaluation, training = lowest_figures(quick_run, name, TEST_SEED)
    record_property("figure", min(*evaluation.values(), *training.values()))
    assert min(evaluation.values()) >= threshold, f"{name} quick evaluation: {evaluation} < {threshold:.3f} ({baseline})"
    assert min(training.values()) >= threshold, f"{name} quick training: {training} < {threshold:.3f} ({baseline})"


@pytest.mark.learning
def test_quick_cartpole_learns(quick_run, record_property, tmp_path):
    """Both CartPole-v1 seeds reach :data:`CARTPOLE_MIN` in evaluation and training, in one of up to three
    independently seeded quick runs (the module's run, then CartPole alone on seeds 1,000 and 2,000 further).

    One run failed on 2 of 40 windows (``python benchmarks/seed_sweep.py -k quick_cartpole --seeds 40
    --first-seed 850``): CartPole seed 878 reached 86.0 over its last training episodes; the other 40
    seeds' lowest figures were 119.5-324.3 (median 162). At 2 failures in 40 per run, the test fails
    with odds 0.05^3 = 1.25e-4 per CI run, and it costs one CartPole run (about 40 s) 1 time in 20.
    """
    name, figures, run, seed = "CartPole-v1", [], quick_run, TEST_SEED
    for offset in (0, 1_000, 2_000):
        if offset:
            seed = TEST_SEED + offset
            run = run_quick(tmp_path / f"seed{seed}", seed, tasks=[name])
        evaluation, training = lowest_figures(run, name, seed)
        figures.append(min(*evaluation.values(), *training.values()))
        if figures[-1] >= CARTPOLE_MIN:
            break
    record_property("figure", figures[0])
    record_property("runs", len(figures))
    assert figures[-1] >= CARTPOLE_MIN, (f"{name}: the lowest of evaluation and last-{LAST_EPISODES}-episode training "
                                         f"returns per run {figures} < {CARTPOLE_MIN} (random ~{CARTPOLE_RANDOM})")


@pytest.mark.learning
def test_quick_keyword_learns(quick_run, record_property):
    task = TASKS["keyword"]
    threshold = task.chance + MIN_GAP_CLOSED * (task.optimum - task.chance)
    assert_every_seed_reaches(quick_run, record_property, "keyword", threshold, f"chance {task.chance}")


def test_quick_writes_table_plots_and_logs(quick_run):
    out, stdout, results = quick_run
    table = (out / "results.md").read_text()
    assert table.strip() in stdout
    header, rule, *rows = table.strip().splitlines()
    assert header.startswith("| task | steps")
    assert [row.split("|")[1].strip() for row in rows] == ["CartPole-v1", "keyword"]
    # The table's mean +/- std is that of the per-seed scores in results.json.
    for row, name, digits in [(rows[0], "CartPole-v1", 1), (rows[1], "keyword", 3)]:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        values = list(scores(results, name).values())
        assert cells[1] == ("20,000 / 100,000" if name == "CartPole-v1" else "6,000")
        assert cells[2] == f"{np.mean(values):.{digits}f} ± {np.std(values):.{digits}f}"
        assert cells[3] == "2"
    assert rows[1].split("|")[6].strip() == f"{TASKS['keyword'].chance:.3f}"

    for name in ["learning_curves.png", "curve_CartPole-v1.png", "curve_keyword.png"]:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 200_000, name
    runs = sorted(p.name for p in (out / "tensorboard").iterdir())
    assert runs == sorted(f"{name}_seed{seed}_1" for name in ("CartPole-v1", "keyword") for seed in (TEST_SEED, TEST_SEED + 1))
    assert all(any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard" / r).iterdir()) for r in runs)


def test_monitor_episodes_orders_envs_by_wall_time(tmp_path):
    script = load_script()
    # Two envs' Monitor files (columns r, l, t); env 1 started 1 s later, so its episode ending at
    # t = 0.5 (absolute 1.5) comes after env 0's at t = 1.0 and before env 0's at t = 2.0.
    (tmp_path / "0.monitor.csv").write_text('#{"t_start": 100.0, "env_id": "x"}\nr,l,t\n1.0,10,1.0\n3.0,30,2.0\n')
    (tmp_path / "1.monitor.csv").write_text('#{"t_start": 101.0, "env_id": "x"}\nr,l,t\n2.0,20,0.5\n')
    steps, returns = script.monitor_episodes(str(tmp_path))
    np.testing.assert_array_equal(steps, [10, 30, 60])
    np.testing.assert_array_equal(returns, [1.0, 2.0, 3.0])
    # Window of 1 (3 episodes < 5 * window): plain interpolation, held constant outside the data.
    np.testing.assert_allclose(script.learning_curve(str(tmp_path), np.array([0, 20, 45, 100])), [1.0, 1.5, 2.5, 3.0])


def test_unknown_task_is_rejected():
    with pytest.raises(SystemExit):
        load_script().main(["--tasks", "CartPole-v1", "NoSuchTask-v0"])


def test_the_data_parallel_row_splits_envs_and_minibatch_over_its_ranks():
    """CartPole-v1-2ranks collects the single-process row's transitions per iteration (half the envs
    on each of 2 ranks) and averages two half minibatches per optimizer step."""
    script = load_script()
    benches = script.all_benchmarks()
    single, parallel = benches["CartPole-v1"], benches["CartPole-v1-2ranks"]
    assert (single.ranks, parallel.ranks) == (1, 2)
    assert parallel.n_envs * 2 == single.n_envs
    assert parallel.ppo_kwargs["batch_size"] * 2 == single.ppo_kwargs["batch_size"]
    assert parallel.total_timesteps == single.total_timesteps
    with pytest.raises(ValueError, match="split over 3 ranks"):
        script.data_parallel_benchmark(single, ranks=3)
