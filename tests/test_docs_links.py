"""Links between pages cannot rot (docs/testing.md, "Docs that cannot rot").

Two checks share the work. Inside the Sphinx site, MyST resolves every Markdown link and ``{doc}``
reference while building, and with ``-W`` a missing page, file or heading anchor
(``myst.xref_missing``) fails ``tests/test_docs.py``'s build; :func:`test_myst_fails_the_build_on_a_broken_link`
pins that behaviour with the site's own MyST settings. README.md is not part of the site (GitHub
renders it), so :func:`test_relative_links_point_at_existing_files_and_anchors` reads the relative
links of README.md and every docs page itself: each must name an existing file or folder, and an
``#anchor`` into a Markdown page must be one of its headings' anchors (GitHub-style slugs, the ones
MyST makes for ``myst_heading_anchors`` levels).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
HEADING_ANCHOR_LEVELS = 3  # docs/conf.py: myst_heading_anchors


def pages() -> list[Path]:
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)]


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    out, fence = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match[1]
        elif fence is not None and line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is None:
            out.append((number, line))
    return out


def slug(title: str) -> str:
    """The anchor GitHub and MyST give a heading: rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link's text
    text = re.sub(r"\{[a-z:]+\}`([^`]*)`", r"\1", text).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for _, line in prose_lines(path) if path.suffix == ".md" else ():
        match = HEADING.match(line)
        if match and len(match[1]) <= HEADING_ANCHOR_LEVELS:
            base = slug(match[2])
            name, n = base, 0
            while name in found:  # repeated headings: -1, -2, ...
                n += 1
                name = f"{base}-{n}"
            found.add(name)
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    return [(number, target) for number, line in prose_lines(path)
            for target in LINK.findall(re.sub(r"(`+).*?\1", "", line))  # not inside inline code
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target)]  # http:, https:, mailto:, ...


def test_relative_links_point_at_existing_files_and_anchors():
    broken = []
    for page in pages():
        for number, target in relative_links(page):
            file, _, anchor = target.partition("#")
            resolved = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not resolved.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{where} (no heading with that anchor in {resolved.relative_to(ROOT)})")
    assert not broken, "broken relative links:\n" + "\n".join(broken)


def test_the_link_reader(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` section: *one*\n\n## A `code` section: *one*\n")
    page = tmp_path / "page.md"
    page.write_text('[a](other.md#a-code-section-one) ![b](img.png "title") [c](https://x.org)\n'
                    "`[d](inline.md)`\n```\n[e](in_a_block.md)\n```\n[f](#local)\n")
    assert relative_links(page) == [(1, "other.md#a-code-section-one"), (1, "img.png"), (6, "#local")]
    assert anchors(tmp_path / "other.md") == {"other-page", "a-code-section-one", "a-code-section-one-1"}


def test_myst_fails_the_build_on_a_broken_link(tmp_path):
    pytest.importorskip("myst_parser", reason="needs the docs tools (the test extra installs them on Python >= 3.11)")
    import runpy

    conf = runpy.run_path(str(ROOT / "docs" / "conf.py"))
    assert not {"myst", "myst.xref_missing"} & set(conf.get("suppress_warnings", []))
    settings = {k: v for k, v in conf.items() if k.startswith("myst_")}
    (tmp_path / "conf.py").write_text("extensions = ['myst_parser']\n"
                                      + "".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    (tmp_path / "index.md").write_text("# Index\n\n```{toctree}\nother\n```\n\n[page](other.md#a-section)\n")
    (tmp_path / "other.md").write_text("# Other\n\n## A section\n")
    build = [sys.executable, "-m", "sphinx", "-q", "-W", "--keep-going", "-b", "html", str(tmp_path), str(tmp_path / "_build")]
    assert subprocess.run(build, capture_output=True, text=True).returncode == 0
    for broken in ("missing.md", "other.md#no-such-section", "no_such_file.py"):
        (tmp_path / "index.md").write_text(f"# Index\n\n```{{toctree}}\nother\n```\n\n[page]({broken})\n")
        result = subprocess.run(build, capture_output=True, text=True)
        assert result.returncode != 0 and "myst.xref_missing" in result.stderr, (broken, result.stderr)
