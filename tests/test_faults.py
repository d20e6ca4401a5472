"""Faults lose nothing: a kill, a full disk or a read-only folder during a save leaves the last
complete checkpoint loadable; damaged files raise errors that name them; a saved run refuses an
env with another tokenizer; bad inputs are named with their fix."""

from __future__ import annotations

import errno
import os

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
