"""Data-parallel training on ``torch.distributed``: one SB3 run across processes, GPUs and machines.

:func:`data_parallel` turns an upstream SB3 on-policy model (``PPO``, ``A2C``, sb3-contrib's
``MaskablePPO``; with :class:`agents.TransformerPolicy` or SB3's own policies) into decentralised
distributed PPO (DD-PPO; Wijmans et al. 2020, "DD-PPO: Learning Near-Perfect PointGoal Navigators
from 2.5 Billion Frames"): every rank collects rollouts from its own envs and trains on them, and
the gradients are averaged across ranks before every optimizer step. The gradient averaging is
PyTorch's own ``DistributedDataParallel`` (bucketed all-reduce overlapped with the backward pass);
the process group is ``torch.distributed``'s (``gloo`` on CPU, ``nccl`` on GPU), launched by
``torchrun`` on one machine or many (c10d rendezvous). What this module adds is what SB3 needs
around it:

- the same initial weights on every rank (DDP broadcasts rank 0's parameters and buffers);
- each rank's envs and RNGs seeded apart (``seed + rank * n_envs``: rank ``r``'s env ``i`` gets the
  seed a single process with ``world_size * n_envs`` envs would give env ``r * n_envs + i``);
- the same number of optimizer steps on every rank: the episode buffers agree on their minibatch
  count (:func:`agents.algorithms.buffers.agreed_minibatches`) and SB3's ``target_kl`` early stop
  compares the *global* approximate KL of the minibatch, so all ranks stop at the same step;
- global statistics: the KL controller (:class:`agents.KLPenaltyCallback`) updates from every
  rank's episodes, and every logged scalar is the mean over ranks (``time/total_timesteps`` and
  ``time/fps`` the sum; the logger's step is the global timestep count);
- one writer: rank 0 alone writes TensorBoard, the console table, checkpoints, the saved zip and
  the exported model (the other ranks' loggers have no outputs and their ``model.save`` writes nothing);
- a collective timeout, so a rank that dies or hangs makes the others fail (with a note naming their
  rank and timestep) instead of waiting for ever.

``learn(total_timesteps)`` keeps SB3's meaning, the run's total: each rank collects
``ceil(total_timesteps / world_size)`` steps, and ``model.num_timesteps`` counts the rank's own.

Advantage normalisation (SB3's ``normalize_advantage``) stays per rank and per minibatch, as in
DD-PPO: one update of 2 ranks equals a single-process update over the union of their minibatches
when advantages are not normalised and the minibatches hold the same number of transitions.
"""

from __future__ import annotations

import math
import os
from abc import ABC
from datetime import timedelta
from typing import Any

import numpy as np
import torch as th
import torch.distributed as dist
from stable_baselines3.common.logger import KVWriter
from torch.nn.parallel import DistributedDataParallel

from agents.distributed import collectives

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks before the run fails (``init_process_group``'s
``timeout``). Longer than the slowest step between two collectives (one rollout of the real 135M
model on a CPU takes ~20 s; a checkpoint write a few seconds)."""

SUMMED_KEYS = frozenset({"time/total_timesteps", "time/fps"})
"""Logged scalars that add up over ranks (counts and rates); every other scalar is averaged."""

_LAUNCH_HINT = ("launch every rank with torchrun (e.g. `torchrun --standalone --nproc-per-node 2 train.py`), "
                "which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, or call "
                "torch.distributed.init_process_group yourself before data_parallel(model)")


def local_device() -> th.device:
    """The device this rank should build its model on: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU.

    Pass it to the algorithm (``PPO(..., device=agents.local_device())``): SB3's ``device="auto"``
    puts every rank of a machine on ``cuda:0``.
    """
    if th.cuda.is_available():
        return th.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return th.device("cpu")


def init_process_group(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group that ``torchrun`` describes in the environment, if any and not joined yet.

    :param backend: ``"gloo"`` or ``"nccl"``; ``None``: ``nccl`` when CUDA is available, else ``gloo``.
    :param timeout_s: collective timeout in seconds (:data:`DEFAULT_TIMEOUT_S`).
    :return: whether this process is now one rank of a group of more than one.
    :raises RuntimeError: ``WORLD_SIZE`` > 1 is set but ``RANK`` or ``MASTER_ADDR`` is missing.
    """
    if collectives.is_data_parallel():
        return True
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: {_LAUNCH_HINT}")
    backend = backend or ("nccl" if th.cuda.is_available() else "gloo")
    if backend == "nccl":
        th.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return collectives.is_data_parallel()


def data_parallel(model: Any, backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                  find_unused_parameters: bool = False) -> Any:
    """Make ``model`` train data-parallel across the ranks of a ``torchrun`` launch (DD-PPO); a no-op in one process.

    Call it on every rank after building the model and before ``learn()``; the same script runs
    unchanged with ``python`` (world size 1: ``model`` is returned untouched) and with
    ``torchrun --nproc-per-node N``. In place: ``model``'s class becomes a subclass of its own
    (``isinstance(model, PPO)`` still holds) that splits ``learn``'s budget over the ranks, agrees
    on early stops and logs global means; its policy's ``evaluate_actions`` runs through
    ``DistributedDataParallel``. See the module docstring for what is agreed and why.

    :param model: an SB3 ``OnPolicyAlgorithm`` (``PPO``, ``A2C``, ``MaskablePPO``) built with the
        same arguments on every rank (the same ``n_envs``, ``n_steps`` and ``batch_size``).
    :param backend: process-group backend if the group is not initialised yet (see
        :func:`init_process_group`).
    :param timeout_s: collective timeout in seconds.
    :param find_unused_parameters: ``DistributedDataParallel``'s option, for a policy with trainable
        parameters that some forward passes do not use.
    :return: ``model``.
    :raises TypeError: ``model`` is not an on-policy SB3 algorithm (off-policy algorithms and
        sb3-contrib's ``TRPO`` have no single gradient step per minibatch to average).
    :raises ValueError: the ranks were built with different ``n_envs``, ``n_steps``, ``batch_size``,
        algorithm or policy class, or the model is on another rank's GPU.
    """
    from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

    if not isinstance(model, OnPolicyAlgorithm):
        raise TypeError(f"data_parallel needs an SB3 on-policy algorithm (PPO, A2C, MaskablePPO), got "
                        f"{type(model).__name__}")
    if type(model).__name__ == "TRPO" or "TRPO" in {c.__name__ for c in type(model).__mro__}:
        raise TypeError("data_parallel does not support TRPO: its conjugate-gradient step is not one gradient "
                        "all-reduce per minibatch; use PPO (agents.text_ppo_kwargs()) for data-parallel runs")
    if isinstance(model, DataParallelAlgorithm) or not init_process_group(backend, timeout_s):
        return model
    _check_same_setup(model)
    if model.device.type == "cuda" and model.device.index not in (None, th.cuda.current_device()):
        raise ValueError(f"rank {collectives.rank()} built its model on {model.device}, but its GPU is "
                         f"cuda:{th.cuda.current_device()}: pass device=agents.local_device() to the algorithm")

    rank, world = collectives.rank(), collectives.world_size()
    if model.seed is not None:
        model.set_random_seed(model.seed + rank * model.n_envs)
        if model._last_obs is not None and model.num_timesteps == 0:
            model._last_obs = None  # a fresh model: reset the envs with their new seeds in learn()
    if rank != 0:
        model.verbose = 0
        model.tensorboard_log = None
    model._data_parallel = _State(model, find_unused_parameters, world)
    model.__class__ = _data_parallel_class(type(model))
    return model


def _check_same_setup(model: Any) -> None:
    setup = dict(algorithm=type(model).__name__, policy=type(model.policy).__name__, n_envs=model.n_envs,
                 n_steps=model.n_steps, batch_size=getattr(model, "batch_size", None),
                 n_epochs=getattr(model, "n_epochs", None))
    setups = collectives.all_gather_object(setup)
    differing = sorted({key for other in setups for key in setup if other[key] != setups[0][key]})
    if differing:
        raise ValueError("every rank of a data-parallel run must build the same model; these settings differ: "
                         + ", ".join(f"{key} {[s[key] for s in setups]}" for key in differing)
                         + ". Build the model from the same arguments on every rank (only the seed differs, "
                         "and data_parallel offsets it).")


class _EvaluateActions(th.nn.Module):
    """``policy.evaluate_actions`` as a module's ``forward``, so that DDP can hook it."""

    def __init__(self, policy: th.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, obs: Any, actions: th.Tensor, **kwargs: Any) -> Any:
        return type(self.policy).evaluate_actions(self.policy, obs, actions, **kwargs)


class _State:
    """What a data-parallel model carries besides SB3's state (never saved: see ``_excluded_save_params``)."""

    def __init__(self, model: Any, find_unused_parameters: bool, world_size: int):
        self.world_size = world_size
        self.training = False
        self.target_kl: float | None = None
        self.minibatch: Any = None
        device_ids = [model.device] if model.device.type == "cuda" else None
        # DDP's constructor broadcasts rank 0's parameters and buffers: the same initial weights everywhere.
        self.ddp = DistributedDataParallel(_EvaluateActions(model.policy), device_ids=device_ids,
                                           find_unused_parameters=find_unused_parameters)
        _sync_master_weights(model.policy)
        policy_evaluate = self.ddp.forward

        def evaluate_actions(obs: Any, actions: th.Tensor, **kwargs: Any) -> Any:
            values, log_prob, entropy = policy_evaluate(obs, actions, **kwargs)
            if self.training and self.target_kl is not None and th.is_grad_enabled():
                self._agree_on_early_stop(model, log_prob)
            return values, log_prob, entropy

        model.policy.evaluate_actions = evaluate_actions
        self._record_minibatches(model.rollout_buffer)

    def _record_minibatches(self, buffer: Any) -> None:
        get = buffer.get

        def recording_get(*args: Any, **kwargs: Any) -> Any:
            for minibatch in get(*args, **kwargs):
                self.minibatch = minibatch
                yield minibatch

        buffer.get = recording_get

    def _agree_on_early_stop(self, model: Any, log_prob: th.Tensor) -> None:
        # SB3's PPO stops an epoch when this minibatch's approximate KL exceeds 1.5 * target_kl, just
        # before its backward. Each rank computes it on its own minibatch; a rank that stopped alone
        # would leave the others waiting in DDP's all-reduce. So the decision is made here, on the
        # global figure, and handed to SB3's comparison as a target that every rank's local value
        # passes (-inf) or fails (+inf).
        with th.no_grad():
            log_ratio = log_prob - self.minibatch.old_log_prob
            kl = (th.exp(log_ratio) - 1) - log_ratio
        approx_kl, _ = collectives.global_mean(float(kl.sum()), kl.numel())
        model.target_kl = -math.inf if approx_kl > 1.5 * self.target_kl else math.inf


def _sync_master_weights(policy: Any) -> None:
    # Float32 master copies of low-precision weights (agents.policy.precision) are not module
    # parameters, so DDP's broadcast does not reach them: copy the broadcast weights into them.
    # (NLPO's masking LM needs nothing: it copies the policy at the first rollout.)
    masters = getattr(policy, "master_weights", None)
    if masters is not None:
        with th.no_grad():
            for p, master in masters.pairs:
                if p is not master:
                    master.copy_(p)


class _GlobalMeanWriter(KVWriter):
    """SB3 ``KVWriter`` that replaces each logged scalar by its mean over ranks (sum for :data:`SUMMED_KEYS`),
    then hands the record to this rank's real writers (rank 0's; the others have none)."""

    def __init__(self, writers: list[KVWriter], world_size: int):
        self.writers = writers
        self.world_size = world_size

    def write(self, key_values: dict[str, Any], key_excluded: dict[str, tuple[str, ...]], step: int = 0) -> None:
        scalars = {key: float(value) for key, value in key_values.items() if _is_scalar(value)}
        gathered = collectives.all_gather_object(scalars)
        merged, excluded = dict(key_values), dict(key_excluded)
        for key in sorted({key for ranks_scalars in gathered for key in ranks_scalars}):
            values = [ranks_scalars[key] for ranks_scalars in gathered if key in ranks_scalars]
            merged[key] = float(np.sum(values)) if key in SUMMED_KEYS else float(np.mean(values))
            excluded.setdefault(key, ())
        for writer in self.writers:
            writer.write(merged, excluded, step * self.world_size)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def _is_scalar(value: Any) -> bool:
    if isinstance(value, th.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


class DataParallelAlgorithm(ABC):
    """Mixin that :func:`data_parallel` puts in front of a model's algorithm class (``DataParallelPPO``, ...).

    It changes only what SB3 does once per ``learn``, per update and per save: the budget split and
    the global logger (``_setup_learn``), the agreed early stop (``train``), rank 0 as the only
    writer (``save``) and the rank and timestep noted on an exception (``learn``). It derives from
    ``ABC`` as SB3's ``BaseAlgorithm`` does, so that the subclass has the same object layout and an
    existing model's ``__class__`` can become it.
    """

    def _setup_learn(self, total_timesteps: int, callback: Any = None, reset_num_timesteps: bool = True,
                     tb_log_name: str = "run", progress_bar: bool = False) -> Any:
        world = self._data_parallel.world_size
        per_rank = math.ceil(total_timesteps / world)
        total, callback = super()._setup_learn(per_rank, callback, reset_num_timesteps, tb_log_name,
                                               progress_bar and collectives.rank() == 0)
        formats = self._logger.output_formats
        if not (len(formats) == 1 and isinstance(formats[0], _GlobalMeanWriter)):
            own = formats if collectives.rank() == 0 else []
            self._logger.output_formats = [_GlobalMeanWriter(list(own), world)]
        return total, callback

    def train(self) -> None:
        state: _State = self._data_parallel
        state.training, state.target_kl = True, getattr(self, "target_kl", None)
        try:
            super().train()
        finally:
            state.training = False
            if hasattr(self, "target_kl"):
                self.target_kl = state.target_kl

    def learn(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().learn(*args, **kwargs)
        except Exception as error:
            error.add_note(f"textgym data-parallel run: raised on rank {collectives.rank()} of "
                           f"{collectives.world_size()} at this rank's timestep {self.num_timesteps}")
            raise

    def save(self, *args: Any, **kwargs: Any) -> None:
        """SB3's ``save``, on rank 0 only (the ranks hold the same weights)."""
        if collectives.rank() == 0:
            super().save(*args, **kwargs)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_data_parallel"]


_CLASSES: dict[type, type] = {}


def _data_parallel_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"DataParallel{cls.__name__}", (DataParallelAlgorithm, cls),
                             {"__module__": __name__, "__doc__": f"{cls.__name__} trained data-parallel "
                                                                  "(see agents.data_parallel)."})
    return _CLASSES[cls]
