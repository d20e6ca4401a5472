"""The Sphinx site in ``docs/`` builds with warnings as errors and documents every public name.

The build is the one ``docs/conf.py`` names (``python -m sphinx -W --keep-going -b html docs
docs/_build/html``), into a temporary directory; it imports torch and transformers through
autodoc (about 15 s on 2 cores).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="needs the docs tools (the test extra installs them on Python >= 3.11)")
pytest.importorskip("myst_parser", reason="needs the docs tools (the test extra installs them on Python >= 3.11)")
pytest.importorskip("furo", reason="needs the docs tools (the test extra installs them on Python >= 3.11)")

import agents  # noqa: E402
import textgym  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_without_warnings_and_cover_the_public_names(tmp_path):
    html = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-b", "html", "-W", "--keep-going", "-d", str(tmp_path / "doctrees"),
         "docs", str(html)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"sphinx exited {result.returncode}; stderr:\n{result.stderr}"

    # Every public name has an entry (an object description with its anchor) somewhere in the site:
    # agents' names as agents.<name>, textgym's in the module that defines them.
    anchors: set[str] = set()
    for page in html.rglob("*.html"):
        anchors |= set(re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page.read_text()))
    expected = {f"agents.{name}" for name in agents.__all__ if name != "TEXT_PPO_DEFAULTS"}
    expected.add("agents.algorithms.defaults.TEXT_PPO_DEFAULTS")  # a re-exported dict: its doc comment is in its module
    expected |= {f"{module}.{name}" for name, module in textgym._PUBLIC.items()}
    assert set(textgym._PUBLIC) == set(textgym.__all__)
    assert not expected - anchors, f"public names missing from the API reference: {sorted(expected - anchors)}"
