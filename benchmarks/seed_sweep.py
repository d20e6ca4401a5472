"""Run every test marked ``learning`` over many seeds and print, per test, how often it passes.

A learning test takes its base seed from ``TEXTGYM_TEST_SEED`` (``tests/conftest.py``) and must pass
for any value of it. This script runs ``pytest -m learning`` once per seed, in parallel processes
(one per core by default, each on one torch thread, as the suite runs), reads each test's outcome,
wall time and the figure it records (``record_property("figure", ...)``: the reward, win rate or KL
its threshold is applied to) from pytest's JUnit XML, and prints a markdown table::

    python benchmarks/seed_sweep.py                      # seeds 0-15, every learning test
    python benchmarks/seed_sweep.py --seeds 100 --first-seed 100 -k dialogue

Use it before changing a learning default or a learning test's setup. The table and the raw
outcomes go to ``--out`` (JSON) as well. ``--first-seed`` moves the window: CI's own seed is
derived from the commit (``.ci/run``), so the tests must pass off the swept window too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, pytest_args: list[str], workdir: Path) -> tuple[int, list[dict], float]:
    """``pytest -m learning`` with ``TEXTGYM_TEST_SEED=seed``: (seed, one record per test, wall s)."""
    xml = workdir / f"seed{seed}.xml"
    env = {**os.environ, "TEXTGYM_TEST_SEED": str(seed), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    start = time.perf_counter()
    # xunit1: JUnit XML whose schema has test-case properties (record_property); pytest warns under xunit2
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider",
                    "-W", "ignore", f"--junitxml={xml}", "-o", "junit_family=xunit1", *pytest_args],
                   cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - start
    if not xml.exists():
        raise RuntimeError(f"pytest wrote no report for seed {seed}: run it by hand to see why: "
                           f"TEXTGYM_TEST_SEED={seed} python -m pytest -m learning {' '.join(pytest_args)}")
    return seed, parse_junit(xml), wall


def parse_junit(path: Path) -> list[dict]:
    """One dict per test case of a JUnit XML report: ``test``, ``passed``, ``skipped``, ``seconds``, ``figure``."""
    records = []
    for case in ET.parse(path).getroot().iter("testcase"):
        module = case.get("classname", "").replace(".", "/")
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        skipped = case.find("skipped") is not None
        failed = case.find("failure") is not None or case.find("error") is not None
        records.append(dict(test=f"{module}.py::{case.get('name')}", passed=not failed and not skipped,
                            skipped=skipped, seconds=float(case.get("time", 0.0)),
                            figure=float(props["figure"]) if "figure" in props else None))
    return records


def summarise(outcomes: dict[int, list[dict]]) -> list[dict]:
    """Per test: seeds run, passes, failing seeds, median / min / max figure, median seconds."""
    by_test: dict[str, list[tuple[int, dict]]] = {}
    for seed, records in sorted(outcomes.items()):
        for record in records:
            if not record["skipped"]:
                by_test.setdefault(record["test"], []).append((seed, record))
    rows = []
    for test, runs in sorted(by_test.items()):
        figures = [r["figure"] for _, r in runs if r["figure"] is not None]
        rows.append(dict(test=test, seeds=len(runs), passed=sum(r["passed"] for _, r in runs),
                         failing_seeds=[s for s, r in runs if not r["passed"]],
                         median=statistics.median(figures) if figures else None,
                         min=min(figures) if figures else None, max=max(figures) if figures else None,
                         seconds=statistics.median(r["seconds"] for _, r in runs)))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table of :func:`summarise`'s rows."""
    def fmt(x):
        return "" if x is None else f"{x:.3f}"

    lines = ["| test | passed | failing seeds | median figure | min | max | s per run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        failing = " ".join(map(str, r["failing_seeds"])) or "-"
        lines.append(f"| `{r['test']}` | {r['passed']}/{r['seeds']} | {failing} | {fmt(r['median'])} | "
                     f"{fmt(r['min'])} | {fmt(r['max'])} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=16, help="how many seeds (default 16)")
    parser.add_argument("--first-seed", type=int, default=0, help="first TEXTGYM_TEST_SEED (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel pytest processes")
    parser.add_argument("-k", help="pytest -k expression: a subset of the learning tests")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seed_sweep.json")
    args = parser.parse_args()
    if args.seeds < 1 or args.workers < 1:
        parser.error("--seeds and --workers must be at least 1")
    pytest_args = ["-k", args.k] if args.k else []
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    start = time.perf_counter()
    outcomes = {}
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as pool:
        for seed, records, wall in pool.map(lambda s: run_seed(s, pytest_args, Path(tmp)), seeds):
            outcomes[seed] = records
            print(f"seed {seed}: {sum(r['passed'] for r in records)}/{len(records)} passed in {wall:.0f} s",
                  flush=True)
    rows = summarise(outcomes)
    wall = time.perf_counter() - start
    print(f"\nTEXTGYM_TEST_SEED {seeds.start}-{seeds.stop - 1}, {args.workers} processes, {wall:.0f} s in all\n")
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(seeds=list(seeds), workers=args.workers, wall_s=wall, rows=rows,
                                        outcomes={str(s): r for s, r in outcomes.items()}), indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
