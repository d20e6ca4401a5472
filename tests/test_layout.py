"""Package layout: ``import textgym`` and ``import agents`` stay light, old module paths name their
new place, and the public names still resolve to the objects in their new modules."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import agents
import agents.algorithms
import agents.policy
import agents.training
import textgym.prompts
import textgym.rewards


def test_import_textgym_is_light_and_registers_the_ids():
    code = (
        "import sys, gymnasium, textgym\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
        "print('TextGen-v0' in gymnasium.registry, 'TextGen-Keyword-v0' in gymnasium.registry,"
        " 'TextGen-Reasoning-v0' in gymnasium.registry)\n"
        "import textgym.env, textgym.rewards, textgym.prompts, textgym.tasks.synthetic, textgym.tasks.reasoning\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split("\n")[:3] == ["[]", "True True True", "[]"], result.stdout + result.stderr


def test_import_agents_leaves_sb3_contrib_peft_and_the_zoo_out_until_used():
    code = (
        "import sys, agents\n"
        "print(sorted({'sb3_contrib', 'rl_zoo3', 'peft'} & set(sys.modules)))\n"
        "print(all(getattr(agents, name) is not None for name in agents.__all__))\n"
        "print(sorted({'sb3_contrib', 'rl_zoo3', 'peft'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Resolving every public name imports sb3-contrib (NLPO, TRPO), and still neither peft nor the zoo.
    assert result.stdout.split("\n")[:3] == ["[]", "True", "['sb3_contrib']"], result.stdout + result.stderr


def test_agents_names_are_their_floors_names():
    floors = (agents.policy, agents.algorithms, agents.training)
    assert sorted(agents.__all__) == sorted(name for floor in floors for name in floor.__all__)
    for floor in floors:
        for name in floor.__all__:
            assert getattr(agents, name) is getattr(floor, name), name
    assert agents.TransformerTRPO.__module__ == "agents.algorithms.trpo"
    with pytest.raises(AttributeError, match="nope"):
        agents.nope  # noqa: B018
    with pytest.raises(AttributeError, match="nope"):
        agents.algorithms.nope  # noqa: B018


@pytest.mark.parametrize("old, new", [
    ("textgym.reward_model", "textgym.rewards.finetuned"),
    ("textgym.synthetic", "textgym.tasks.synthetic"),
    ("textgym.train_reward_model", "textgym.rewards.train_reward_model"),
    ("textgym.train_sentiment_head", "textgym.rewards.train_sentiment_head"),
    ("agents.buffers", "agents.algorithms.buffers"),
    ("agents.defaults", "agents.algorithms.defaults"),
    ("agents.kl", "agents.algorithms.kl"),
    ("agents.nlpo", "agents.algorithms.nlpo"),
    ("agents.trpo", "agents.algorithms.trpo"),
    ("agents.extractor", "agents.policy.extractor"),
    ("agents.kv_cache", "agents.policy.kv_cache"),
    ("agents.lora", "agents.policy.lora"),
    ("agents.precision", "agents.policy.precision"),
    ("agents.prefix_sharing", "agents.policy.prefix_sharing"),
    ("agents.callbacks", "agents.training.callbacks"),
    ("agents.evaluation", "agents.training.evaluation"),
    ("agents.export", "agents.training.export"),
    ("agents.resume", "agents.training.resume"),
])
def test_old_module_paths_name_their_new_module(old, new):
    with pytest.raises(ModuleNotFoundError, match=f"{old} moved to {new}"):
        importlib.import_module(old)
    importlib.import_module(new)


def test_old_lora_path_names_where_the_adapter_checkpoints_went():
    from agents.training.checkpoints import load_adapters, save_adapters

    with pytest.raises(ModuleNotFoundError, match="save_adapters, load_adapters: agents.training.checkpoints"):
        from agents.lora import save_adapters  # noqa: F401
    assert agents.save_adapters is save_adapters and agents.load_adapters is load_adapters


def test_the_policy_keeps_its_path():
    # agents.policy is now the floor's package: models saved before the move pickled their policy
    # class as agents.policy.TransformerPolicy, and that still loads.
    from agents.policy import TransformerPolicy

    assert TransformerPolicy is agents.TransformerPolicy


def test_old_public_names_resolve_to_the_new_modules():
    from textgym.rewards.embeddings import mean_pool
    from textgym.rewards.finetuned import FineTunedRewardModel
    from textgym.rewards.sentiment import SentimentRewardModel
    from textgym.tasks.sentiment import movie_review_prompts
    from textgym.tasks.synthetic import TASKS

    assert textgym.FineTunedRewardModel is FineTunedRewardModel
    assert textgym.rewards.SentimentRewardModel is SentimentRewardModel
    assert textgym.rewards.mean_pool is mean_pool
    assert textgym.TASKS is TASKS
    assert textgym.prompts.movie_review_prompts is movie_review_prompts
    assert textgym.movie_review_prompts is movie_review_prompts
    for name in textgym.__all__:
        assert getattr(textgym, name) is not None


def test_unknown_attributes_raise_attribute_error():
    with pytest.raises(AttributeError, match="nope"):
        textgym.nope  # noqa: B018
    with pytest.raises(AttributeError, match="nope"):
        textgym.rewards.nope  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is not installed (pip install -e '.[test]')")
def test_ruff_finds_nothing():
    # The rules and line length are pyproject.toml's [tool.ruff]; --no-cache keeps the checkout clean.
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=repo,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
