"""Every ```python block of README.md and docs/**/*.md runs (docs/testing.md, "Docs that cannot rot").

The blocks of one page run in order in one namespace (a later block may use the ``env`` or
``model`` of an earlier one), in a fresh working directory, under stand-ins that make them fast and
offline: the text envs' registered defaults (``TextGen-v0``'s SmolLM2, movie-review prompts and
sentiment reward model; the chat tasks' SmolLM2) are replaced by a tiny random Llama with a
word-level chat tokenizer and the keyword reward, and ``textgym.DEFAULT_MODEL`` names that tiny
model. Arguments a block passes itself win over the stand-ins, as over any registered default.
And ``learn`` trains at most :data:`MAX_LEARN_STEPS` timesteps per call (at least one rollout, as
SB3 always collects), so a block that shows a realistic budget still runs in seconds.

A block that is not meant to run (it needs a GPU, a cluster, the network, or minutes) opts out
with a first line ``# no-run: <why>``; :data:`NO_RUN` is that marker.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import pytest

import textgym
from textgym.tasks.synthetic import KeywordReward
from textgym.tiny import TINY_WORDS, save_tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
NO_RUN = "# no-run:"
"""First line of a ```python block that is shown but not executed; the reason follows the colon."""

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
PYTHON_INFO = {"python", "py", "python3"}
MAX_LEARN_STEPS = 512
"""Cap on ``total_timesteps`` of every ``learn`` call while the blocks run."""


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str

    @property
    def runs(self) -> bool:
        return not self.code.lstrip().startswith(NO_RUN)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md and every Markdown page of the docs site (build output excluded)."""
    docs = ROOT / "docs"
    return [ROOT / "README.md", *sorted(p for p in docs.rglob("*.md") if "_build" not in p.relative_to(docs).parts)]


def python_blocks(path: Path) -> list[Block]:
    """The fenced ```python blocks of a Markdown file, dedented (blocks inside list items are indented)."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, start = match["fence"], i
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence) and not lines[j].strip().strip(fence[0])), len(lines))
        if match["info"].strip() in PYTHON_INFO:
            blocks.append(Block(path, start + 1, textwrap.dedent("\n".join(lines[start + 1:end])) + "\n"))
        i = end + 1
    return blocks


PAGES = [page for page in doc_pages() if python_blocks(page)]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Tiny, offline defaults for the registered text envs while the blocks run (see the module docstring)."""
    lm = str(save_tiny_causal_lm(tmp_path_factory.mktemp("docs_lm"), "llama", chat=True,
                                 words=(*TINY_WORDS, "please", "salt", "time"), max_position_embeddings=512))
    chat = {"model_name_or_path": lm}
    defaults = {
        "TextGen-v0": {**chat, "prompts": ["the movie was", "a film is", "one two", "the film was very"],
                       "reward_model": KeywordReward(slots=4, keyword="good"), "max_new_tokens": 4},
        "TextGen-Reasoning-v0": chat,
        "TextGen-Dialogue-v0": chat,
        "TextArena-v0": chat,
    }
    from sb3_contrib import MaskablePPO
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    def capped(learn):
        def learn_at_most(self, total_timesteps, *args, **kwargs):
            return learn(self, min(total_timesteps, MAX_LEARN_STEPS), *args, **kwargs)
        return learn_at_most

    with pytest.MonkeyPatch.context() as patch:
        for algorithm in (OnPolicyAlgorithm, MaskablePPO):
            patch.setattr(algorithm, "learn", capped(algorithm.learn))
        for env_id, kwargs in defaults.items():
            spec = gym.registry[env_id]
            patch.setattr(spec, "kwargs", {**spec.kwargs, **kwargs})
        patch.setattr(textgym, "DEFAULT_MODEL", lm)
        yield lm


# Both are what the pages show: a single env's rollout (32) below text_ppo_kwargs' minibatch of 128,
# which docs/getting-started.md explains, and SB3's progress_bar=True, which uses tqdm's rich bar.
@pytest.mark.filterwarnings("ignore:You have specified a mini-batch size of 128:UserWarning")
@pytest.mark.filterwarnings("ignore:rich is experimental")
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_the_pages_python_blocks_run(page, stand_ins, tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if not block.runs:
            continue
        try:
            exec(compile(block.code, str(block), "exec"), namespace)  # noqa: S102  (the docs' own code)
        except Exception as error:
            raise AssertionError(f"the python block at {block} failed: {type(error).__name__}: {error}") from error


def test_the_blocks_are_found_and_every_opt_out_says_why():
    blocks = [block for page in doc_pages() for block in python_blocks(page)]
    assert len(blocks) >= 10 and any(b.path.name == "README.md" for b in blocks)
    for block in blocks:
        if not block.runs:
            reason = block.code.lstrip().splitlines()[0][len(NO_RUN):].strip()
            assert reason, f"{block}: say why the block does not run ({NO_RUN} <why>)"


def test_the_block_parser(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\nx = 1\n```\n\n- item\n\n  ```python\n  y = 2\n  ```\n"
                    "````md\n```python\nnot = 'a block'\n```\n````\n```bash\nls\n```\n")
    assert [(b.line, b.code) for b in python_blocks(page)] == [(2, "x = 1\n"), (8, "y = 2\n")]
