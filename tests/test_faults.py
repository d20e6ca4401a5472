"""Faults lose nothing: a kill, a full disk or a read-only folder during a save leaves the last
complete checkpoint loadable; damaged files raise errors that name them; a saved run refuses an
env with another tokenizer; bad inputs are named with their fix."""

from __future__ import annotations

import errno
import os
import re
import shutil

import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from agents import RollingCheckpointCallback, TransformerPolicy, latest_checkpoint, load_training_state, text_ppo_kwargs
from agents.training import atomic
from agents.training.atomic import TEMP_PREFIX, atomic_directory, atomic_write_bytes

N_ENVS, N_STEPS = 2, 4
ROLLOUT = N_ENVS * N_STEPS


def make_model(env_kwargs, seed=0):
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=seed, env_kwargs=env_kwargs)
    return PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=N_STEPS, batch_size=ROLLOUT, n_epochs=1))


def checkpointing(path, **kwargs):
    return RollingCheckpointCallback(save_freq=N_STEPS, save_path=str(path), keep_last=1, training_state=True, **kwargs)


def temporaries(path):
    return sorted(p.name for p in path.iterdir() if p.name.startswith(TEMP_PREFIX))


def assert_loads(checkpoint, env_kwargs):
    """The checkpoint's zip and training state load into a fresh env."""
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=1, env_kwargs=env_kwargs)
    model = PPO.load(checkpoint.model, env=env)
    load_training_state(model, checkpoint.training_state)
    assert model.num_timesteps == checkpoint.steps


def test_atomic_writes_replace_whole_or_not_at_all(tmp_path):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and temporaries(tmp_path) == []

    folder = tmp_path / "folder"
    with atomic_directory(folder) as new:
        (new / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(folder) as new:
        (new / "a").write_text("2")
        raise RuntimeError("killed")
    assert (folder / "a").read_text() == "1" and temporaries(tmp_path) == []
    (folder / "keep").write_text("mine")
    with atomic_directory(folder, merge=True) as new:
        (new / "a").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == ["a", "keep"] and (folder / "a").read_text() == "3"
    with atomic_directory(folder) as new:
        (new / "b").write_text("4")
    assert sorted(p.name for p in folder.iterdir()) == ["b"] and temporaries(tmp_path) == []


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def read_only(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_a_failed_save_raises_naming_the_file_and_keeps_the_last_checkpoint(fault, tiny_env_kwargs, tmp_path,
                                                                             monkeypatch):
    """A full disk fails the flush of a file being written; a read-only folder refuses the temporary
    (simulated: the tests run as root, whom permissions do not stop)."""
    model = make_model(tiny_env_kwargs)
    model.learn(2 * ROLLOUT, callback=checkpointing(tmp_path))  # saved at the second rollout's start: 8 steps
    before = sorted(p.name for p in tmp_path.iterdir())
    if fault == "disk_full":
        monkeypatch.setattr(atomic, "_fsync_file", disk_full)
    else:
        monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    expected = errno.ENOSPC if fault == "disk_full" else errno.EACCES
    with pytest.raises(OSError, match=r"could not write .*rl_model_24_steps\.zip.*nothing was replaced") as caught:
        model.learn(2 * ROLLOUT, callback=checkpointing(tmp_path), reset_num_timesteps=False)
    assert caught.value.errno == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temporaries, nothing pruned
    monkeypatch.undo()
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.steps == ROLLOUT
    assert_loads(checkpoint, tiny_env_kwargs)


def test_an_interrupted_newer_save_is_passed_over(tiny_env_kwargs, tmp_path):
    """Files of a newer checkpoint without its manifest (a kill before the manifest) are never chosen,
    and the next save's pruning does not delete the last complete checkpoint for them."""
    model = make_model(tiny_env_kwargs)
    model.learn(2 * ROLLOUT, callback=checkpointing(tmp_path))
    (tmp_path / "rl_model_99_steps.zip").write_bytes(b"PK\x03\x04 half a zip")
    assert latest_checkpoint(tmp_path).steps == ROLLOUT
    (tmp_path / f"{TEMP_PREFIX}rl_model_16_steps-x.zip").write_bytes(b"left by a kill")
    model.learn(2 * ROLLOUT, callback=checkpointing(tmp_path), reset_num_timesteps=False)
    assert latest_checkpoint(tmp_path).steps == 3 * ROLLOUT and temporaries(tmp_path) == []
    assert "rl_model_8_steps.zip" not in os.listdir(tmp_path)  # pruned once the newer one was complete


@pytest.fixture(scope="module")
def saved_run(tiny_lm, tmp_path_factory):
    """(folder, env kwargs): a run checkpointed once with its training state, at 8 steps."""
    from tests.conftest import MAX_NEW_TOKENS, PROMPTS, keyword_reward

    env_kwargs = {"model_name_or_path": tiny_lm, "prompts": PROMPTS, "reward_model": keyword_reward,
                  "max_prompt_tokens": 5, "max_new_tokens": MAX_NEW_TOKENS}
    folder = tmp_path_factory.mktemp("saved_run")
    make_model(env_kwargs).learn(2 * ROLLOUT, callback=checkpointing(folder))
    return folder, env_kwargs


def damaged_copies(data: bytes, n_flips: int = 12):
    """(what, bytes): single-byte flips spread over the file, and truncations."""
    rng = np.random.default_rng(0)
    positions = sorted({0, 1, len(data) // 2, len(data) - 1, *rng.integers(0, len(data), n_flips - 4).tolist()})
    for position in positions:
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        yield f"flip at {position}", bytes(damaged)
    for length in (0, 10, len(data) // 3, len(data) - 1):
        yield f"truncated to {length}", data[:length]


def test_damaged_training_states_raise_naming_the_file_and_digests(saved_run, tmp_path):
    folder, env_kwargs = saved_run
    checkpoint = latest_checkpoint(folder)
    model = PPO.load(checkpoint.model, env=make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs))
    data, trials = checkpoint.training_state.read_bytes(), 0
    for what, damaged in damaged_copies(data):
        path = tmp_path / "state.pkl"
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"state\.pkl.*use the previous checkpoint") as caught:
            load_training_state(model, path)
        if "checksum" in str(caught.value):
            assert re.search(r"expected SHA-256 [0-9a-f]{64}, actual [0-9a-f]{64}", str(caught.value)), what
        trials += 1
    assert trials == 16


def test_a_training_state_without_checksum_still_loads_with_a_warning(saved_run, tmp_path):
    from agents.training.resume import MAGIC

    folder, env_kwargs = saved_run
    checkpoint = latest_checkpoint(folder)
    data = checkpoint.training_state.read_bytes()
    assert data.startswith(MAGIC)
    legacy = tmp_path / "old_state.pkl"
    legacy.write_bytes(data.partition(b"\n")[2].partition(b"\n")[2])  # the pickle alone, as textgym wrote it before
    model = PPO.load(checkpoint.model, env=make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs))
    with pytest.warns(UserWarning, match="no checksum"):
        load_training_state(model, legacy)
    with pytest.raises(ValueError, match="not a training-state file"):
        load_training_state(model, checkpoint.model)  # the zip passed instead


@pytest.mark.parametrize("part", ["model", "training_state"])
def test_latest_checkpoint_verifies_every_file_against_its_manifest(part, saved_run, tmp_path):
    folder, _ = saved_run
    copy = tmp_path / "run"
    shutil.copytree(folder, copy)
    file = latest_checkpoint(copy).parts[part]
    data, trials = file.read_bytes(), 0
    for what, damaged in damaged_copies(data):
        file.write_bytes(damaged)
        with pytest.warns(UserWarning, match="skipping a damaged checkpoint"), \
                pytest.raises(ValueError, match=rf"{re.escape(file.name)} has .*manifest.*use the previous checkpoint"):
            latest_checkpoint(copy)
        trials += 1
    assert trials == 16
    file.write_bytes(data)
    assert latest_checkpoint(copy).steps == ROLLOUT


@pytest.fixture(scope="module")
def shuffled_lm(tmp_path_factory):
    """A tiny LM whose tokenizer has the conftest one's vocabulary size but its words in reverse order."""
    from textgym.tiny import TINY_WORDS, save_tiny_lm

    return str(save_tiny_lm(tmp_path_factory.mktemp("shuffled_lm"), words=tuple(reversed(TINY_WORDS))))


def test_a_saved_run_refuses_an_env_with_another_tokenizer(saved_run, shuffled_lm):
    from textgym import allow_other_tokenizer

    folder, env_kwargs = saved_run
    checkpoint = latest_checkpoint(folder)
    other_kwargs = {**env_kwargs, "model_name_or_path": shuffled_lm}
    other = make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=other_kwargs)
    saved_space = PPO.load(checkpoint.model).observation_space
    assert other.observation_space.vocab_size == saved_space.vocab_size  # SB3's shape check alone would pass
    pattern = rf"{re.escape(env_kwargs['model_name_or_path'])}.*tokenizer_fingerprint.*{re.escape(shuffled_lm)}"
    with pytest.raises(ValueError, match=pattern):
        PPO.load(checkpoint.model, env=other)
    with allow_other_tokenizer():  # the documented override
        model = PPO.load(checkpoint.model, env=other)
    with pytest.raises(ValueError, match=rf"tokenizer of .*{re.escape(env_kwargs['model_name_or_path'])}.*"
                                         rf"{re.escape(shuffled_lm)}.*allow_other_tokenizer"):
        load_training_state(model, checkpoint.training_state)
    with allow_other_tokenizer():
        load_training_state(model, checkpoint.training_state)


def test_spaces_pickled_before_fingerprints_compare_as_before(make_tiny_env):
    import pickle

    space = make_tiny_env().observation_space
    assert space.tokenizer_fingerprint is not None and f"tokenizer_fingerprint={space.tokenizer_fingerprint!r}" in repr(space)
    old = pickle.loads(pickle.dumps(space))
    del old.tokenizer_fingerprint  # as unpickled from a zip of an older textgym
    assert old == space and space == old and not (old != space)
    assert "tokenizer_fingerprint" not in repr(old)


def test_damaged_zips_raise_naming_the_file(saved_run, tmp_path):
    """Truncated anywhere, or with a byte flipped (zipfile's CRC-32 catches flips in the members),
    a zip loaded through load_algorithm raises ValueError naming it; never SB3's bare AssertionError."""
    from agents import load_algorithm

    folder, env_kwargs = saved_run
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs)
    data, outcomes = latest_checkpoint(folder).model.read_bytes(), {"raised": 0, "loaded": 0}
    for what, damaged in damaged_copies(data):
        path = tmp_path / "run.zip"
        path.write_bytes(damaged)
        try:
            load_algorithm(path, env)
            outcomes["loaded"] += 1  # a flip in zip metadata no reader checks; the manifest catches those
            assert what.startswith("flip"), what
        except ValueError as error:
            assert re.search(r"run\.zip could not be loaded by PPO\.load .*use the previous checkpoint", str(error)), what
            outcomes["raised"] += 1
    assert outcomes["raised"] >= 12 and sum(outcomes.values()) == 16, outcomes


def test_resume_latest_loads_the_newest_whole_checkpoint_or_none(saved_run, shuffled_lm, tmp_path):
    from agents import resume_latest

    folder, env_kwargs = saved_run
    assert resume_latest(tmp_path / "empty", make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs)) is None
    model = resume_latest(folder, make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs=env_kwargs))
    assert model.num_timesteps == ROLLOUT and model._last_obs is not None
    other = make_vec_env("TextGen-v0", n_envs=N_ENVS, env_kwargs={**env_kwargs, "model_name_or_path": shuffled_lm})
    with pytest.raises(ValueError, match=r"does not fit the env: Observation spaces do not match.*allow_other_tokenizer"):
        resume_latest(folder, other)


def test_reward_models_returning_none_are_named():
    from textgym.rewards import check_rewards

    with pytest.raises(ValueError, match=r"returned None for 2 completions.*return statement"):
        check_rewards(None, 2)
    with pytest.raises(ValueError, match=r"returned None for completion\(s\) \[1\] of 2"):
        check_rewards([0.5, None], 2)


def test_a_missing_local_model_path_is_named(tmp_path):
    import gymnasium as gym

    from agents import load_causal_lm

    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match=rf"model path '{re.escape(missing)}' does not exist.*needs internet"):
        gym.make("TextGen-v0", model_name_or_path=missing, prompts=["a"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_causal_lm(missing)


def test_maskable_ppo_without_nlpo_kwargs_fails_at_construction_naming_the_fix(tiny_env_kwargs):
    from sb3_contrib import MaskablePPO

    from agents import MaskableTransformerPolicy

    env = make_vec_env("TextGen-v0", n_envs=1, env_kwargs=tiny_env_kwargs)
    with pytest.raises(ValueError, match=r"nlpo_kwargs\(\).*use_masking=False"):
        MaskablePPO(MaskableTransformerPolicy, env)
