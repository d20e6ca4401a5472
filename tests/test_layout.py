"""Package layout: ``import textgym`` and ``import agents`` stay light, old module paths name their
new place, and the public names still resolve to the objects in their new modules."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import warnings
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
def test_old_module_paths_import_the_new_module_and_name_it(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(FutureWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new) and module.__spec__.name == new


def test_old_lora_path_names_where_the_adapter_checkpoints_went(monkeypatch):
    from agents.training.checkpoints import load_adapters, save_adapters

    monkeypatch.delitem(sys.modules, "agents.lora", raising=False)
    with pytest.warns(FutureWarning, match="save_adapters, load_adapters: agents.training.checkpoints"):
        with pytest.raises(ImportError, match="save_adapters"):
            from agents.lora import save_adapters  # noqa: F401
    assert agents.save_adapters is save_adapters and agents.load_adapters is load_adapters


def test_a_model_saved_before_the_move_still_loads(tiny_env_kwargs, tmp_path, monkeypatch):
    """SB3 zips pickle the rollout buffer class by module path; one saved before ``agents/`` was
    arranged by role says ``agents.buffers``. Built here by saving under that path."""
    import base64
    import json
    import zipfile

    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=tiny_env_kwargs)
    model = PPO(agents.TransformerPolicy, env, seed=0, **agents.text_ppo_kwargs(n_steps=4, batch_size=8))
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # cloudpickle imports the old path to check it
        patch.setattr(agents.EpisodeRolloutBuffer, "__module__", "agents.buffers")
        model.save(tmp_path / "old.zip")
    with zipfile.ZipFile(tmp_path / "old.zip") as archive:
        pickled = json.loads(archive.read("data"))["rollout_buffer_class"][":serialized:"]
    assert b"agents.buffers" in base64.b64decode(pickled)  # the premise: the old path is in the zip
    monkeypatch.delitem(sys.modules, "agents.buffers", raising=False)
    with pytest.warns(FutureWarning, match="agents.buffers moved to agents.algorithms.buffers"):
        loaded = PPO.load(tmp_path / "old.zip", env=env)
    assert loaded.rollout_buffer_class is agents.EpisodeRolloutBuffer


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
