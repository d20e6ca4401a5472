"""Faults lose nothing: a kill, a full disk or a read-only folder during a save leaves the last
complete checkpoint loadable; damaged files raise errors that name them; a saved run refuses an
env with another tokenizer; bad inputs are named with their fix."""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys

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
    with pytest.raises(ValueError, match=r"returned None for completion\(s\) \[0\] of 1"):
        check_rewards(np.array([None]), 1)


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


# --- kill -9 and a full disk in a child process -----------------------------------------------------------

KILLS = 24
"""Kills per run of the kill test, at delays after a save starts spread from 0 to 2 times the
duration of a save (measured first; a loaded machine slows the child), so that every stage is
hit: the zip, its rename, the training state, the manifest, the pruning, and the training after it."""

FSIZE_FRACTIONS = [0.0, 0.1, 0.5, 0.9, 0.999]
"""File-size limits (``RLIMIT_FSIZE``, times the zip's size) under which a child saves: a disk full
at that point of the zip."""


def fork_training(model, folder, setup, learn_timesteps, signal_saves=None, before=None):
    """Fork a child that continues ``model.learn`` with rolling checkpoints into ``folder`` (a save
    at every rollout start, the last one kept); returns ``(pid, read end of its pipe)``.

    The child writes ``b"s"`` to the pipe at the start of every save, and at its end ``b"ok"`` or
    the ``OSError`` it raised; it leaves through ``os._exit``, never through pytest's teardown."""
    from tests.test_resume import N_STEPS, kl_callback

    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    os.close(read)
    code = 1
    # Progress bars would write to pytest's capture files, which the file-size limit also stops.
    sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115  (the child never returns to close it)
    try:
        if before is not None:
            before()
        save = RollingCheckpointCallback._save

        def signalling(self):
            os.write(write, b"s")
            save(self)

        RollingCheckpointCallback._save = signalling
        checkpoints = RollingCheckpointCallback(save_freq=N_STEPS, save_path=str(folder), keep_last=1,
                                                training_state=True)
        model.learn(learn_timesteps, callback=[kl_callback(), checkpoints], reset_num_timesteps=False)
        os.write(write, b"ok")
        code = 0
    except OSError as error:
        os.write(write, f"OSError {error.errno} {error}".encode())
        code = 3
    finally:
        os._exit(code)


def read_all(fd) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


@pytest.fixture
def forked_run(tiny_env_kwargs, tmp_path):
    """(setup, model, folder): a test_resume-style run after 2 rollouts with one complete checkpoint."""
    from tests.test_resume import N_STEPS, ROLLOUT, kl_callback, make_model

    setup = ("TextGen-v0", {**tiny_env_kwargs, "eos_token_id": None})
    model = make_model(setup)
    base = tmp_path / "base"
    model.learn(2 * ROLLOUT, callback=[kl_callback(), RollingCheckpointCallback(
        save_freq=N_STEPS, save_path=str(base), keep_last=1, training_state=True)])
    return setup, model, base


def time_one_save(model, folder) -> float:
    """Seconds of one rolling-checkpoint save of ``model`` (the median of three), written into ``folder``."""
    import statistics
    import time

    callback = RollingCheckpointCallback(save_freq=1, save_path=str(folder), keep_last=1, training_state=True)
    callback.init_callback(model)
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        callback._save()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def load_checkpoint(checkpoint, setup):
    from tests.test_resume import make_env

    model = PPO.load(checkpoint.model, env=make_env(setup))
    load_training_state(model, checkpoint.training_state)
    assert model.num_timesteps == checkpoint.steps
    return model


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the child is forked from the trained run")
def test_kill_9_at_any_moment_of_a_save_leaves_the_newest_complete_checkpoint_loadable(forked_run, tmp_path):
    import signal
    import time

    from tests.test_resume import ROLLOUT, assert_same_run, kl_callback

    from agents.training.resume import _rng_state, _set_rng_state

    setup, model, base = forked_run
    base_steps, rng = latest_checkpoint(base).steps, _rng_state()  # loading a checkpoint below sets the global RNGs
    save_seconds = time_one_save(model, tmp_path / "timing")
    counts = {"trials": 0, "interrupted_saves": 0, "newer_checkpoint": 0, "loaded": 0}
    last = None
    for index in range(KILLS):
        folder = tmp_path / f"trial{index}"
        shutil.copytree(base, folder)
        _set_rng_state(rng)  # every child continues the same run (PPO.load below seeds the global generators)
        pid, pipe = fork_training(model, folder, setup, learn_timesteps=100 * ROLLOUT)
        assert os.read(pipe, 1) == b"s"  # the child's first save has started
        time.sleep(2 * save_seconds * index / (KILLS - 1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        read_all(pipe)
        checkpoint = latest_checkpoint(folder)
        newest_files = max(int(m.group(1)) for p in folder.iterdir() if (m := re.search(r"_(\d+)_steps", p.name)))
        counts["interrupted_saves"] += bool(temporaries(folder)) or newest_files > checkpoint.steps
        counts["newer_checkpoint"] += checkpoint.steps > base_steps
        load_checkpoint(checkpoint, setup)
        counts["loaded"] += 1
        counts["trials"] += 1
        last = checkpoint
    assert counts["trials"] == counts["loaded"] == KILLS
    assert counts["interrupted_saves"] >= 3 and counts["newer_checkpoint"] >= 1, counts  # kills hit saves, and after

    # One case resumed: equal to the run the kill interrupted, continued uninterrupted (the parent's model).
    total = last.steps + 2 * ROLLOUT
    resumed, kl_b = load_checkpoint(last, setup), kl_callback()
    resumed.learn(total - resumed.num_timesteps, callback=kl_b, reset_num_timesteps=False)
    kl_a = kl_callback()
    _set_rng_state(rng)  # the generators as the killed child had them when it was forked
    model.learn(total - model.num_timesteps, callback=[kl_a, RollingCheckpointCallback(
        save_freq=5, save_path=str(tmp_path / "reference"), keep_last=1, training_state=True)],
        reset_num_timesteps=False)
    assert_same_run(model, resumed, kl_a, kl_b)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the child is forked from the trained run")
def test_a_full_disk_in_a_child_leaves_the_last_checkpoint_loadable(forked_run, tmp_path):
    import resource
    import signal

    from tests.test_resume import ROLLOUT

    setup, model, base = forked_run
    base_checkpoint = latest_checkpoint(base)
    zip_size = base_checkpoint.model.stat().st_size
    failures = 0
    for index, fraction in enumerate(FSIZE_FRACTIONS):
        folder = tmp_path / f"full{index}"
        shutil.copytree(base, folder)
        limit = int(zip_size * fraction)

        def fill_disk(limit=limit):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

        pid, pipe = fork_training(model, folder, setup, learn_timesteps=2 * ROLLOUT, before=fill_disk)
        _, status = os.waitpid(pid, 0)
        report = read_all(pipe).lstrip(b"s").decode()
        assert os.waitstatus_to_exitcode(status) == 3, report
        assert re.fullmatch(rf"OSError {errno.EFBIG} .*could not write {re.escape(str(folder))}/.*nothing was replaced.*",
                            report), report
        assert temporaries(folder) == []
        checkpoint = latest_checkpoint(folder)
        assert checkpoint.steps == base_checkpoint.steps
        load_checkpoint(checkpoint, setup)
        failures += 1
    assert failures == len(FSIZE_FRACTIONS)


@pytest.mark.parametrize("kind", ["inference_only", "adapters_only"])
def test_policy_and_adapter_checkpoints_are_verified_too(kind, tiny_env_kwargs, tmp_path):
    from tests.test_callbacks import train_with_one_checkpoint

    train_with_one_checkpoint(tiny_env_kwargs, tmp_path, lora=True, **{kind: True})
    checkpoint = latest_checkpoint(tmp_path)
    part = checkpoint.parts["policy" if kind == "inference_only" else "adapters"]
    file = part if part.is_file() else part / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="skipping a damaged"), pytest.raises(ValueError, match=re.escape(file.name)):
        latest_checkpoint(tmp_path)


def test_a_failed_export_leaves_no_half_directory(tiny_env_kwargs, tmp_path, monkeypatch):
    from agents import export_pretrained

    model = make_model(tiny_env_kwargs)
    target = tmp_path / "export"
    monkeypatch.setattr(atomic, "_fsync_file", disk_full)
    with pytest.raises(OSError, match=rf"could not write {re.escape(str(target))}: No space left"):
        export_pretrained(model, target)
    assert not target.exists() and os.listdir(tmp_path) == []
    monkeypatch.undo()
    export_pretrained(model, target)
    (target / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    monkeypatch.setattr(atomic, "_fsync_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_pretrained(model, target, training_settings={"changed": 1})
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before and temporaries(tmp_path) == []
