"""Exact resume: the training state that SB3's ``model.save`` does not keep.

``PPO.load(path, env=env)`` then ``learn(n, reset_num_timesteps=False)`` continues a run from SB3's
zip, which holds the policy's weights, the optimizer's state (with :class:`agents.TransformerPolicy`
the value-head optimizer's too, see its ``value_learning_rate``), the hyperparameters, the counters
(``num_timesteps``, ``_n_updates``, ``_episode_num``), the episode statistics (``ep_info_buffer``,
``ep_success_buffer``) and every other picklable attribute of the model, such as
:class:`agents.KLPenaltyCallback`'s controller (``model.kl_controller``). What the zip lacks makes
the continued run differ from one that was never interrupted:

- the random generators: torch's (CPU, and CUDA where present), numpy's global one (SB3's rollout
  buffers shuffle with it) and Python's ``random`` (TextArena seeds it at every game);
- a low-precision policy's float32 master weights (:class:`agents.policy.precision.MasterWeights`;
  ``PPO.load`` restarts them from the rounded bfloat16 weights). They cost 4 bytes per
  trainable low-precision weight in the file (538 MB for SmolLM2-135M in bfloat16); a float32 or
  LoRA policy has none, and its file holds little more than the observations and env states;
- each env's ``np_random`` and its episode in progress (``get_episode_state``: a
  :class:`textgym.TextGenEnv`'s prompt and tokens so far; a :class:`textgym.DialogueEnv`'s game,
  conversation and return);
- the ``Monitor`` wrapper's episode in progress and totals, ``TimeLimit``'s step count;
- the observation the next rollout starts from (``model._last_obs``: ``PPO.load`` drops it, so
  ``learn`` would reset every env and cut the episodes in progress);
- with RLOO/GRPO, the returns :class:`agents.GroupRelativeRolloutBuffer` carries into the next
  rollout for the episodes still running; with NLPO, the policy's rollout count (which rollouts
  refresh the masking LM) and the masking LM as last refreshed (``MaskablePPO.load`` makes it the
  loaded policy): its weights not shared with the policy, so 4 bytes per weight under full
  fine-tuning (538 MB for SmolLM2-135M) and only the adapters' under LoRA.

:func:`save_training_state` writes these to one file; :func:`load_training_state` puts them back into
the model ``PPO.load`` returned and into its fresh envs::

    model.learn(10_000, callback=KLPenaltyCallback(AdaptiveKLController(0.05, target=4.0)))
    model.save("run.zip")
    save_training_state(model, "run_state.pkl")
    # ... later, in a new process:
    env = make_vec_env("TextGen-v0", n_envs=8, env_kwargs=...)          # built as before
    model = PPO.load("run.zip", env=env)
    load_training_state(model, "run_state.pkl")
    model.learn(10_000, callback=KLPenaltyCallback(AdaptiveKLController(0.05, target=4.0)),
                reset_num_timesteps=False)

:class:`agents.RollingCheckpointCallback` with ``training_state=True`` writes both files at rollout
boundaries during ``learn``. The continued run then ends with the same weights, the same Monitor
episodes and the same KL coefficient as an uninterrupted one (tested to float tolerance).
``model = resume_latest(save_path, env)`` loads the newest complete checkpoint of such a folder,
verified against its manifest (:func:`agents.latest_checkpoint`), with its training state.

In a data-parallel run (:func:`agents.data_parallel`) every rank calls :func:`save_training_state`
(a collective: it gathers every rank's generators, envs and observations) and rank 0 writes one
file; every rank calls :func:`load_training_state` on that file (on storage all ranks can read), after
``data_parallel(model)``, and takes back its own part. Such a file resumes with the same world size
only (each rank's envs are in it); the weights, masters and NLPO state are stored once.

Save between PPO iterations only: after ``learn`` returns, or from a callback's
``_on_rollout_start``. In the middle of a rollout (``_on_step``) or between a rollout and its update
(``_on_rollout_end``) the rollout in progress would be lost; :func:`save_training_state` refuses.

Not restored: envs in other processes (``SubprocVecEnv``: raises); VecEnv wrappers with state of
their own (``VecNormalize``, ``VecMonitor``, ``VecFrameStack``: raise; any other wrapper is passed
through and assumed to keep nothing between steps); gym wrappers other than ``Monitor`` and
``TimeLimit``; envs without ``get_episode_state``/``set_episode_state`` (raise); reward models and
games that keep state outside the env's episode (a reward model is rebuilt by the env's
constructor; a dialogue's game is saved whole); ``Monitor``'s start time and its file (its episodes'
``t`` count from the new ``Monitor``'s start, and a ``monitor_dir`` file is started anew unless
``monitor_kwargs=dict(override_existing=False)``); the envs' action-space generators (PPO never
samples them); ``np_random_seed`` (``-1`` after a resume, as Gymnasium reports for any generator set
directly). TensorBoard continues in the run's last directory (SB3's behaviour with
``reset_num_timesteps=False``).

The file is a header (:data:`MAGIC`, a version and the SHA-256 of the rest) and a pickle
(``cloudpickle``, as SB3's zip uses): :func:`load_training_state` refuses a file whose bytes changed
since the save, but a checksum is no signature: load only files you trust.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import random
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, VecFrameStack, VecMonitor, VecNormalize

from agents.distributed import collectives
from agents.training.atomic import atomic_write_bytes
from agents.training.distributed import DataParallelAlgorithm, data_parallel
from agents.training.manifest import DAMAGED

FORMAT = "textgym.training_state"
"""The ``format`` entry of a training-state file."""

VERSION = 1
"""The ``version`` entry of files this module writes; other versions raise on load."""

MAGIC = b"textgym.training_state\n"
"""First bytes of a training-state file; a header line ``<HEADER_VERSION> <sha256 hex>`` and the pickle follow."""

HEADER_VERSION = 1
"""Version of the header; files without one (older textgym: a bare pickle) load with a warning."""

MONITOR_FIELDS = ("rewards", "needs_reset", "episode_returns", "episode_lengths", "episode_times", "total_steps",
                  "current_reset_info")
"""SB3 ``Monitor`` attributes saved per env: the episode in progress and the totals."""

STATEFUL_VEC_WRAPPERS = (VecNormalize, VecMonitor, VecFrameStack)
"""VecEnv wrappers whose own state this module does not save; a model whose env has one raises."""


def save_training_state(model: Any, path: str | os.PathLike) -> Path:
    """Write what ``model.save`` does not keep (see the module doc) to ``path``.

    Call it next to ``model.save`` at the same moment, between PPO iterations.

    :param model: an SB3 algorithm (``PPO``, ``A2C``, ...) whose env is a ``DummyVecEnv`` of envs
        with ``get_episode_state`` (every textgym env), possibly inside stateless VecEnv wrappers.
    :param path: file to write (parent folders are created; written atomically, so a kill leaves the
        previous file of that name whole); e.g. ``run_state.pkl``.
    :return: the path written (in a data-parallel run: by rank 0, for every rank).
    :raises OSError: the file could not be written (disk full, permission); the message names it.
    :raises ValueError: the model has not collected a step yet (nothing to resume), or is in the
        middle of a rollout or between a rollout and its update; in a data-parallel run, ``model``
        was not passed to :func:`agents.data_parallel`.
    :raises TypeError: the envs cannot be saved: ``SubprocVecEnv``, a stateful VecEnv wrapper, an
        env without ``get_episode_state``, or an episode state (a dialogue's game) that cannot be pickled.
    """
    venv = _dummy_vec_env(model)
    _check_between_iterations(model, venv)
    shared = {
        "format": FORMAT,
        "version": VERSION,
        "num_timesteps": int(model.num_timesteps),
        "master_weights": [master.detach().cpu().clone() for master in _separate_masters(model.policy)],
        "tokenizer": _tokenizer_of(venv.observation_space),
    }
    own = {
        "rng": _rng_state(),
        "last_obs": copy.deepcopy(model._last_obs),
        "last_episode_starts": copy.deepcopy(model._last_episode_starts),
        "envs": [_env_state(env, i) for i, env in enumerate(venv.envs)],
    }
    # The NLPO state is the same on every rank (it follows the policy's weights), the carried group
    # returns are each rank's own (they belong to its envs' episodes).
    algorithm = _algorithm_state(model)
    shared["algorithm"] = {key: value for key, value in algorithm.items() if key != "group_carry"}
    own["algorithm"] = {key: value for key, value in algorithm.items() if key == "group_carry"}
    if not collectives.is_data_parallel():
        state = {**shared, **own, "algorithm": algorithm}
    else:
        if not isinstance(model, DataParallelAlgorithm):
            raise ValueError(_NOT_WRAPPED)
        ranks = collectives.all_gather_object(_dumps_or_error(own))
        failed = [f"rank {r}: {part}" for r, part in enumerate(ranks) if isinstance(part, str)]
        if failed:  # raised on every rank alike, so none is left waiting in a collective
            raise TypeError(f"the training state cannot be pickled ({'; '.join(failed)}); {_UNPICKLABLE}")
        state = {**shared, "world_size": len(ranks), "ranks": ranks}
        if collectives.rank() != 0:
            return Path(path)
    try:
        data = cloudpickle.dumps(state)
    except Exception as error:  # any object in an episode state may refuse to pickle, each in its own way
        raise TypeError(f"the training state cannot be pickled ({type(error).__name__}: {error}); {_UNPICKLABLE}") from error
    return atomic_write_bytes(path, _with_header(data))


_UNPICKLABLE = "every env's episode state (a DialogueEnv's game) must be picklable to be saved"

_NOT_WRAPPED = ("in a data-parallel run, call agents.data_parallel(model) before save_training_state and "
                "load_training_state (it seeds each rank's generators and envs apart, which would overwrite what "
                "a load restores)")


def _dumps_or_error(part: dict[str, Any]) -> bytes | str:
    """``part`` pickled (``cloudpickle``; plain ``pickle.loads`` reads it), or why it cannot be."""
    try:
        return cloudpickle.dumps(part)
    except Exception as error:  # noqa: BLE001  (as in save_training_state)
        return f"{type(error).__name__}: {error}"


def _own_part(state: dict[str, Any], path: Any) -> dict[str, Any]:
    """This rank's view of ``state``: a data-parallel file's part of this rank merged into the shared
    entries; a single-process file as it is. Raises ``ValueError`` when the world sizes differ."""
    saved_world = state.get("world_size", 1)
    if saved_world != collectives.world_size():
        raise ValueError(f"{path} was saved by a run of {saved_world} rank(s) but this run has "
                         f"{collectives.world_size()}: each rank's generators and envs are in it, so resume with "
                         f"the same world size ({'python' if saved_world == 1 else f'torchrun --nproc-per-node {saved_world}'})")
    if "ranks" not in state:
        return state
    own = pickle.loads(state["ranks"][collectives.rank()])
    return {**state, **own, "algorithm": {**state["algorithm"], **own["algorithm"]}}


def load_training_state(model: Any, path: str | os.PathLike) -> None:
    """Put a :func:`save_training_state` file back into ``model`` and its envs.

    ``model`` is what ``PPO.load(zip, env=env)`` returned for the zip saved with the file, ``env``
    built as the saved run's was (same env ids, arguments, number of envs and wrappers; seeds do not
    matter). This resets the envs once (which applies and so discards the seeds ``PPO.load`` set),
    then overwrites their generators, episodes and ``Monitor`` counters, ``model._last_obs`` and the
    global random generators. Continue with ``model.learn(n, reset_num_timesteps=False)`` (and a
    :class:`agents.KLPenaltyCallback`, which adopts the saved controller).

    :param model: the loaded SB3 algorithm, with its env set.
    :param path: a file written by :func:`save_training_state`.
    :raises ValueError: not a training-state file, another format version, damaged (its SHA-256
        differs from the one in its header: the message names the file, both digests and says to
        use the previous checkpoint), or it does not match the model (other timestep count: a zip
        from another moment) or the envs (number, wrappers, type, a tokenizer with another
        fingerprint: see :func:`textgym.allow_other_tokenizer`), or it was saved by a run of
        another world size, or in a data-parallel run ``model`` was not passed to
        :func:`agents.data_parallel` first. A file of an older textgym, without a checksum, loads
        with a ``UserWarning``.
    :raises TypeError: the envs cannot be restored (see :func:`save_training_state`).
    """
    if collectives.is_data_parallel() and not isinstance(model, DataParallelAlgorithm):
        raise ValueError(_NOT_WRAPPED)
    state = _own_part(_read(Path(path)), path)
    venv = _dummy_vec_env(model)
    if state["num_timesteps"] != model.num_timesteps:
        raise ValueError(f"{path} was saved at {state['num_timesteps']} timesteps but the model is at "
                         f"{model.num_timesteps}; load the zip saved together with it")
    if len(state["envs"]) != venv.num_envs:
        raise ValueError(f"{path} holds {len(state['envs'])} envs but the model's env has {venv.num_envs}; "
                         "build as many envs as the saved run had")
    for index, (env, saved) in enumerate(zip(venv.envs, state["envs"])):
        _check_same_env(env, saved, index)
    _check_same_tokenizer(state.get("tokenizer"), _tokenizer_of(venv.observation_space), path)
    _set_masters(model.policy, state["master_weights"], path)
    _set_algorithm_state(model, state.get("algorithm", {}), path)
    model.get_env().reset()
    for env, saved in zip(venv.envs, state["envs"]):
        _restore_env(env, saved)
    model._last_obs = copy.deepcopy(state["last_obs"])
    model._last_episode_starts = copy.deepcopy(state["last_episode_starts"])
    _set_buffered_obs(venv, state["last_obs"])
    _set_rng_state(state["rng"])  # last: resetting the envs above may draw from Python's random (TextArena)


def resume_latest(directory: str | os.PathLike, env: Any, algorithm: Any = None, name_prefix: str = "rl_model",
                  **load_kwargs: Any) -> Any:
    """Load the newest complete checkpoint of a :class:`agents.RollingCheckpointCallback` folder,
    its files verified (:func:`agents.latest_checkpoint`), with its training state if it has one.

    Continue with ``model.learn(total - model.num_timesteps, reset_num_timesteps=False)``. In a
    data-parallel run (a process group is up) every rank calls it, and the loaded model is made
    data-parallel (:func:`agents.data_parallel`) before its training state is loaded.

    :param directory: the callback's ``save_path``.
    :param env: the envs, built as the saved run's (see :func:`load_training_state`).
    :param algorithm: the SB3 algorithm class (``PPO`` when ``None``; ``MaskablePPO`` for NLPO).
    :param name_prefix: the callback's ``name_prefix``.
    :param load_kwargs: passed to ``algorithm.load`` (``device``, ``custom_objects``, ...).
    :return: the loaded model, or ``None`` when ``directory`` holds no complete checkpoint (start afresh).
    :raises ValueError: every checkpoint is damaged, the zip cannot be read (the message names it and
        says to use the previous checkpoint), the env does not match the saved run (other spaces or
        tokenizer), or what :func:`load_training_state` raises.
    """
    from agents.training.manifest import latest_checkpoint

    checkpoint = latest_checkpoint(directory, name_prefix)
    if checkpoint is None:
        return None
    if checkpoint.model is None:
        raise ValueError(f"{checkpoint.manifest} lists no SB3 zip (an inference-only or adapters-only checkpoint): "
                         "resume from a RollingCheckpointCallback without inference_only/adapters_only")
    model = load_algorithm(checkpoint.model, env, algorithm, **load_kwargs)
    if collectives.is_data_parallel():
        data_parallel(model)  # before the training state: it seeds the ranks apart
    if checkpoint.training_state is not None:
        load_training_state(model, checkpoint.training_state)
    return model


def load_algorithm(path: str | os.PathLike, env: Any, algorithm: Any = None, **load_kwargs: Any) -> Any:
    """``algorithm.load(path, env=env)`` whose failures name the file and the fix.

    SB3 reports a damaged zip as a bare ``AssertionError`` or a zipfile error without the path, and
    an env of another tokenizer as "Observation spaces do not match" without the remedy.

    :param path: an SB3 zip.
    :param env: the envs to attach.
    :param algorithm: the SB3 algorithm class (``PPO`` when ``None``).
    :param load_kwargs: passed to ``algorithm.load``.
    :return: the loaded model.
    :raises ValueError: the zip is damaged (truncated, bytes changed) or the env does not fit it.
    """
    if algorithm is None:
        from stable_baselines3 import PPO

        algorithm = PPO
    damaged = (f"{path} could not be loaded by {algorithm.__name__}.load ({{}}); "
               f"{DAMAGED} (agents.latest_checkpoint finds the newest whole one)")
    try:
        return algorithm.load(path, env=env, **load_kwargs)
    except (AssertionError, zipfile.BadZipFile, EOFError, pickle.UnpicklingError, RuntimeError, KeyError,
            UnicodeDecodeError, zlib.error) as error:  # each a way a damaged zip fails inside SB3 or torch
        raise ValueError(damaged.format(f"{type(error).__name__}: {error}")) from error
    except ValueError as error:
        if "wasn't a zip-file" in str(error):  # SB3's own wrapping of zipfile.BadZipFile
            raise ValueError(damaged.format(error)) from error
        if "spaces do not match" not in str(error):
            raise
        raise ValueError(f"{path} does not fit the env: {error}. Build the env as the saved run did (same model, "
                         "tokenizer and windows); if only the tokenizer's fingerprint differs and you know both map "
                         "every id alike, load inside textgym.allow_other_tokenizer()") from error


def _dummy_vec_env(model: Any) -> DummyVecEnv:
    """The ``DummyVecEnv`` under ``model``'s env, through stateless VecEnv wrappers."""
    env = model.get_env()
    if env is None:
        raise ValueError("the model has no env; pass env= to PPO.load (built as the saved run's)")
    while isinstance(env, VecEnvWrapper):
        if isinstance(env, STATEFUL_VEC_WRAPPERS):
            raise TypeError(f"{type(env).__name__} keeps state of its own that the training state does not save; "
                            "exact resume supports DummyVecEnv and stateless VecEnv wrappers")
        env = env.venv
    if not isinstance(env, DummyVecEnv):
        raise TypeError(f"the envs run in a {type(env).__name__}, not a DummyVecEnv (a SubprocVecEnv's envs live in "
                        "other processes); build them with DummyVecEnv (make_vec_env's default) to save their state")
    return env


def _check_between_iterations(model: Any, venv: DummyVecEnv) -> None:
    """Raise ``ValueError`` unless ``model`` sits between two PPO iterations (see the module doc)."""
    if model._last_obs is None:
        raise ValueError("the model has not collected a step since it was built or loaded (model._last_obs is None): "
                         "there is no run to resume; save after learn()")
    buffer = getattr(model, "rollout_buffer", None)
    # At a step callback SB3 has stepped the envs but not yet moved _last_obs to their new observation.
    in_rollout = not _same_obs(model._last_obs, venv.buf_obs) or (buffer is not None and 0 < buffer.pos < buffer.buffer_size)
    # After a rollout the buffer is full; PPO's update (RolloutBuffer.get) sets generator_ready.
    before_update = buffer is not None and buffer.full and not buffer.generator_ready
    if in_rollout or before_update:
        where = "in the middle of a rollout" if in_rollout else "after a rollout, before its update"
        raise ValueError(f"save_training_state was called {where}, which a resumed run cannot continue exactly; "
                         "save between iterations: after learn() returns or in a callback's _on_rollout_start")


def _same_obs(obs: Any, buf_obs: dict) -> bool:
    """Whether ``obs`` (a dict or an array) equals a ``DummyVecEnv``'s ``buf_obs`` (``{key or None: array}``)."""
    as_dict = obs if isinstance(obs, dict) else {None: obs}
    return set(as_dict) == set(buf_obs) and all(np.array_equal(as_dict[key], buf_obs[key]) for key in buf_obs)


def _set_buffered_obs(venv: DummyVecEnv, obs: Any) -> None:
    as_dict = obs if isinstance(obs, dict) else {None: obs}
    for key, value in as_dict.items():
        venv.buf_obs[key][...] = value


def _separate_masters(policy: Any) -> list[th.Tensor]:
    """The float32 masters of a policy's low-precision weights (none for float32 or LoRA policies)."""
    master_weights = getattr(policy, "master_weights", None)
    return [] if master_weights is None else [master for param, master in master_weights.pairs if param is not master]


@th.no_grad()
def _set_masters(policy: Any, saved: list[th.Tensor], path: Any) -> None:
    masters = _separate_masters(policy)
    if [m.shape for m in masters] != [s.shape for s in saved]:
        raise ValueError(f"{path} holds {len(saved)} float32 master weights but the policy has {len(masters)} "
                         "(of other shapes): load it into a policy of the saved run's dtype and model")
    for master, value in zip(masters, saved):
        master.copy_(value)


def _algorithm_state(model: Any) -> dict[str, Any]:
    """What textgym's algorithm extensions keep between iterations outside SB3's zip: the returns a
    :class:`agents.GroupRelativeRolloutBuffer` carries into the next rollout for its unfinished
    episodes, and an NLPO policy's rollout count, refresh record and masking LM (the weights it
    does not share with the policy: all of them under full fine-tuning, the adapters under LoRA)."""
    state: dict[str, Any] = {}
    carry = getattr(getattr(model, "rollout_buffer", None), "_carry_out", None)
    if carry is not None:
        state["group_carry"] = carry.copy()
    policy = model.policy
    if hasattr(policy, "rollout_count"):
        state["nlpo"] = dict(rollout_count=policy.rollout_count, masking_refreshes=list(policy.masking_refreshes),
                             masking_lm={name: tensor.detach().cpu().clone()
                                         for name, tensor in policy.masking_lm_own_tensors().items()})
    return state


@th.no_grad()
def _set_algorithm_state(model: Any, state: dict[str, Any], path: Any) -> None:
    if "group_carry" in state:
        buffer = getattr(model, "rollout_buffer", None)
        if getattr(buffer, "_carry_out", None) is None or buffer._carry_out.shape != state["group_carry"].shape:
            raise ValueError(f"{path} holds a GroupRelativeRolloutBuffer's carried returns but the model's rollout "
                             "buffer is not one (or has other envs); load the zip saved together with it")
        buffer._carry_out = state["group_carry"].copy()
    if "nlpo" in state:
        policy, nlpo = model.policy, state["nlpo"]
        if not hasattr(policy, "rollout_count"):
            raise ValueError(f"{path} was saved from an NLPO policy but the model's is {type(policy).__name__}")
        policy.rollout_count, policy.masking_refreshes = nlpo["rollout_count"], list(nlpo["masking_refreshes"])
        own = policy.masking_lm_own_tensors()
        if set(own) != set(nlpo["masking_lm"]):
            raise ValueError(f"{path} holds another masking LM ({len(nlpo['masking_lm'])} tensors, this policy's has "
                             f"{len(own)}); load it into the saved run's policy")
        for name, tensor in own.items():
            tensor.copy_(nlpo["masking_lm"][name])


def _rng_state() -> dict[str, Any]:
    return {
        "torch": th.get_rng_state(),
        "cuda": th.cuda.get_rng_state_all() if th.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    th.set_rng_state(state["torch"])
    if state["cuda"] is not None and th.cuda.is_available() and len(state["cuda"]) == th.cuda.device_count():
        th.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _wrappers(env: gym.Env) -> list[gym.Wrapper]:
    """The wrappers around an env, outermost first."""
    found = []
    while isinstance(env, gym.Wrapper):
        found.append(env)
        env = env.env
    return found


def _wrapper_state(wrapper: gym.Wrapper) -> Any:
    if isinstance(wrapper, Monitor):
        return {name: copy.deepcopy(getattr(wrapper, name)) for name in MONITOR_FIELDS}
    if isinstance(wrapper, gym.wrappers.TimeLimit):
        return wrapper._elapsed_steps  # Gymnasium keeps the count only in this attribute
    return None


def _set_wrapper_state(wrapper: gym.Wrapper, state: Any) -> None:
    if isinstance(wrapper, Monitor):
        for name, value in state.items():
            setattr(wrapper, name, copy.deepcopy(value))
    elif isinstance(wrapper, gym.wrappers.TimeLimit):
        wrapper._elapsed_steps = state


def _env_state(env: gym.Env, index: int) -> dict[str, Any]:
    unwrapped = env.unwrapped
    if not callable(getattr(unwrapped, "get_episode_state", None)):
        raise TypeError(f"env {index} ({type(unwrapped).__name__}) has no get_episode_state(): its episode in progress "
                        "cannot be saved; textgym's envs have it (see textgym.TextGenEnv.get_episode_state)")
    return {
        "env_class": type(unwrapped).__name__,
        "np_random": copy.deepcopy(unwrapped.np_random),
        "episode": unwrapped.get_episode_state(),
        "wrappers": [(type(w).__name__, _wrapper_state(w)) for w in _wrappers(env)],
    }


def _tokenizer_of(space: Any) -> dict[str, Any] | None:
    """The model name and tokenizer fingerprint of a :class:`textgym.TokenWindowSpace` (``None`` for other spaces)."""
    fingerprint = getattr(space, "tokenizer_fingerprint", None)
    return None if fingerprint is None else {"model": space.model_name_or_path, "fingerprint": fingerprint}


def _check_same_tokenizer(saved: dict[str, Any] | None, current: dict[str, Any] | None, path: Any) -> None:
    """Raise ``ValueError`` when the saved run's tokenizer and the env's are both known and differ."""
    from textgym.spaces import same_tokenizer

    if saved is None or current is None or same_tokenizer(saved["fingerprint"], current["fingerprint"]):
        return
    raise ValueError(f"{path} was saved with the tokenizer of {saved['model']!r} (fingerprint {saved['fingerprint']}) "
                     f"but the env uses that of {current['model']!r} (fingerprint {current['fingerprint']}): the same "
                     "token ids mean other tokens. Build the env with the saved run's model; if you know both map "
                     "every id alike, load inside textgym.allow_other_tokenizer()")


def _check_same_env(env: gym.Env, saved: dict[str, Any], index: int) -> None:
    """Raise ``ValueError`` unless ``env`` has the saved env's class and wrappers."""
    layers = [type(w).__name__ for w in _wrappers(env)] + [type(env.unwrapped).__name__]
    saved_layers = [name for name, _ in saved["wrappers"]] + [saved["env_class"]]
    if layers != saved_layers:
        raise ValueError(f"env {index} is {layers} (wrappers, then env) but the saved one was {saved_layers}; "
                         "build the envs as the saved run did")


def _restore_env(env: gym.Env, saved: dict[str, Any]) -> None:
    env.unwrapped.set_episode_state(saved["episode"])
    env.unwrapped.np_random = copy.deepcopy(saved["np_random"])
    for wrapper, (_, state) in zip(_wrappers(env), saved["wrappers"]):
        _set_wrapper_state(wrapper, state)


def _read(path: Path) -> dict[str, Any]:
    """The training state in ``path``, its checksum verified, checked for its format and version."""
    data = path.read_bytes()
    if data.startswith(MAGIC):
        payload = _verified_payload(path, data)
    elif data.startswith(b"\x80"):  # a pickle: a file of textgym before the header, with nothing to verify
        payload = data
    else:
        raise ValueError(f"{path} is not a training-state file (written by agents.save_training_state), or its "
                         f"header is damaged (it starts {data[:16]!r}); if it is one, {DAMAGED}")
    try:
        state = pickle.loads(payload)
    except Exception as error:  # noqa: BLE001  (a damaged pickle fails in any of many ways: decoding, EOF, a missing class)
        raise ValueError(f"{path} could not be unpickled ({type(error).__name__}: {error}); {DAMAGED}") from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a training-state file (written by agents.save_training_state)")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} is a training state of version {state.get('version')}; this textgym reads "
                         f"version {VERSION}")
    if payload is data:  # warned only now: a pickle of something else is not a training state at all
        warnings.warn(f"{path} has no checksum (written by an older textgym): it is loaded unverified; "
                      "save it again to add one", UserWarning, stacklevel=3)
    return state


def _with_header(payload: bytes) -> bytes:
    """``payload`` behind the header: :data:`MAGIC`, then ``b"<HEADER_VERSION> <sha256 hex of payload>\\n"``."""
    return MAGIC + f"{HEADER_VERSION} {hashlib.sha256(payload).hexdigest()}\n".encode() + payload


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The payload of a file with a header, after checking its SHA-256."""
    line, newline, payload = data[len(MAGIC):].partition(b"\n")
    fields = line.split(b" ")
    if not newline or len(fields) != 2 or fields[0] != str(HEADER_VERSION).encode():
        raise ValueError(f"{path} has a damaged or unknown header ({line[:80]!r}, this textgym writes version "
                         f"{HEADER_VERSION}); {DAMAGED}")
    expected, actual = fields[1].decode("ascii", "replace"), hashlib.sha256(payload).hexdigest()
    if actual != expected:
        raise ValueError(f"{path} fails its checksum: expected SHA-256 {expected}, actual {actual}; {DAMAGED}")
    return payload
