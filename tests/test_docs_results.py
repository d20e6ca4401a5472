"""The results tables of the docs are the benchmarks' JSON results, not typed by hand.

``docs/generate_results.py`` writes ``docs/_generated/*.md`` from ``benchmarks/results/`` with the
benchmarks' own table functions; ``--check`` fails when a committed table no longer matches the
JSON (a benchmark rerun without regenerating, or a table edited by hand). See docs/testing.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "docs/generate_results.py", *args], cwd=ROOT, capture_output=True, text=True)


def test_the_generated_tables_match_the_benchmark_results():
    result = run("--check")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_names_a_stale_table(monkeypatch, tmp_path):
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import generate_results
    finally:
        sys.path.remove(str(ROOT / "docs"))
    for name, make in generate_results.GENERATED.items():
        (tmp_path / name).write_text(make())
    table = tmp_path / "critic.md"
    table.write_text(table.read_text().replace("| 0.35 |", "| 0.36 |"))  # a hand edit
    monkeypatch.setattr(generate_results, "OUT", tmp_path)
    assert generate_results.main(["--check"]) == 1
    assert generate_results.main([]) == 0 and generate_results.main(["--check"]) == 0


def test_the_pages_include_every_generated_table():
    pages = "".join(page.read_text() for page in (ROOT / "docs").rglob("*.md") if "_generated" not in page.parts)
    for path in (ROOT / "docs" / "_generated").glob("*.md"):
        assert f"_generated/{path.name}" in pages, path.name


def test_the_update_settings_table_pairs_each_setting_with_the_default_on_shared_seeds():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import update_settings
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def run_(variant, seed, trained, sem):
        return dict(variant=variant, seed=seed, trained_reward=trained, trained_sem=sem)

    default = update_settings.DEFAULT_SETTING
    runs = [run_(default, 0, 1.0, 0.1), run_(default, 1, 0.5, 0.2), run_(default, 2, 0.0, 0.3),
            # seed 3 has no default run to pair with, so it must not count
            run_("other", 1, 1.0, 0.2), run_("other", 2, 0.5, 0.1), run_("other", 3, 9.0, 0.1),
            run_("unpaired", 5, 1.0, 0.1)]
    diff, sem, seeds = update_settings.paired_difference(runs, "other")
    assert seeds == 2
    assert diff == ((1.0 - 0.5) + (0.5 - 0.0)) / 2
    assert abs(sem - (0.2**2 + 0.2**2 + 0.1**2 + 0.3**2) ** 0.5 / 2) < 1e-12
    assert update_settings.paired_difference(runs, default) is None
    assert update_settings.paired_difference(runs, "unpaired") is None
