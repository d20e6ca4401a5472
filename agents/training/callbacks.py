"""Callbacks for text training: sampled completions in TensorBoard and on the console, rolling checkpoints."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback

from agents.distributed import collectives
from agents.training.atomic import TEMP_PREFIX, atomic_path
from agents.training.checkpoints import save_adapters
from agents.training.manifest import manifest_name, write_manifest
from agents.training.resume import save_training_state


class SampleTextCallback(BaseCallback):
    """Show a few prompts, completions and rewards from the rollouts while PPO trains (SB3 callback).

    Reward curves say *that* a text policy changed; samples say *how* (a reward model being gamed
    shows here first). Every ``every`` rollouts, the first ``n_samples`` episodes that finish
    during that rollout are recorded as one markdown table — prompt, completion, and every entry of
    ``info["reward_components"]`` (the env's reward before any KL penalty) — under ``samples/text``
    with SB3's logger, which writes strings to TensorBoard's text tab at the current timestep, and
    printed to the console when ``verbose >= 1`` (by rank 0 alone in a data-parallel run: its own
    episodes').

    :param n_samples: episodes shown per logged rollout, >= 1.
    :param every: log every ``every``-th rollout (the first one included); ``None``: chosen at the
        start of ``learn`` so that ``n_logs`` rollouts are logged, evenly spaced.
    :param n_logs: how many rollouts to log per ``learn`` when ``every`` is ``None``, >= 1.
    :param verbose: 1 prints the table; 0 only records it.
    :raises ValueError: ``n_samples``, ``every`` or ``n_logs`` below 1.
    """

    def __init__(self, n_samples: int = 4, every: int | None = None, n_logs: int = 4, verbose: int = 1):
        super().__init__(verbose)
        for name, value in (("n_samples", n_samples), ("n_logs", n_logs), ("every", 1 if every is None else every)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.n_samples, self.every, self.n_logs = n_samples, every, n_logs
        self.rollouts = 0
        self.samples: list[dict[str, Any]] = []
        self.tables: list[str] = []
        """Every table recorded so far (markdown), oldest first."""

    def _on_training_start(self) -> None:
        if self.every is None:
            per_rollout = self.model.n_steps * self.model.n_envs
            total = math.ceil(self.locals["total_timesteps"] / per_rollout)
            self._every = max(1, total // self.n_logs)
        else:
            self._every = self.every

    def _on_rollout_start(self) -> None:
        self.samples = []

    def _on_step(self) -> bool:
        if self.rollouts % self._every != 0 or len(self.samples) >= self.n_samples:
            return True
        for info, done in zip(self.locals["infos"], self.locals["dones"]):
            if done and "completion" in info and len(self.samples) < self.n_samples:
                self.samples.append(info)
        return True

    def _on_rollout_end(self) -> None:
        if self.samples:
            table = samples_table(self.samples)
            self.tables.append(table)
            self.logger.record("samples/text", table, exclude=("stdout", "log", "json", "csv"))
            if self.verbose >= 1 and collectives.rank() == 0:  # one console in a data-parallel run
                print(f"samples at {self.num_timesteps} steps:\n{table}")
        self.rollouts += 1


def samples_table(infos: list[dict[str, Any]]) -> str:
    """Markdown table of finished episodes' ``info`` dicts: prompt, completion, reward components.

    :param infos: final-step infos of TextGen envs (with ``prompt``, ``completion`` and
        ``reward_components``).
    :return: the table; ``|`` and line breaks inside texts are escaped so rows stay rows.
    """
    names = list(dict.fromkeys(name for info in infos for name in info.get("reward_components", {})))

    def cell(text: str) -> str:
        return repr(text)[1:-1].replace("|", "\\|")

    rows = ["| prompt | completion |" + "".join(f" {name} |" for name in names), "|---|---|" + "---|" * len(names)]
    for info in infos:
        components = info.get("reward_components", {})
        values = "".join(f" {components[n]:+.3f} |" if n in components else " |" for n in names)
        rows.append(f"| {cell(info['prompt'])} | {cell(info['completion'])} |{values}")
    return "\n".join(rows)


class RollingCheckpointCallback(CheckpointCallback):
    """SB3's ``CheckpointCallback`` that keeps only the last ``keep_last`` checkpoints, optionally
    without optimizer state, without the frozen base LM, or exactly resumable.

    A full fine-tuning checkpoint of SmolLM2-135M is a 1.6 GB zip (weights plus Adam's two moment
    estimates, see docs/guide/checkpoints.md); a run that saves every few iterations fills a disk quickly. Every
    ``save_freq`` calls (as in SB3: calls of ``env.step``, i.e. ``n_envs`` steps each) this saves

    - by default: the whole algorithm, ``{name_prefix}_{steps}_steps.zip`` (``model.save``; resume
      with ``PPO.load(path, env=env)``);
    - ``training_state=True``: the same zip plus ``{name_prefix}_training_state_{steps}_steps.pkl``
      (:func:`agents.training.resume.save_training_state`: random generators, envs' episodes in progress,
      the next observation), so that ``PPO.load`` + :func:`agents.training.resume.load_training_state` +
      ``learn(..., reset_num_timesteps=False)`` continues as if never interrupted. Both are written
      at the first rollout start at or after every ``save_freq``-th call, i.e. between PPO
      iterations (a checkpoint inside a rollout would lose that rollout), so the step counts in
      the names are multiples of ``n_steps * n_envs``;
    - ``inference_only=True``: only the policy's weights and constructor arguments, no optimizer
      state, ``{name_prefix}_policy_{steps}_steps.pth`` (SB3's ``BasePolicy.save``; load with
      ``TransformerPolicy.load(path)``, e.g. for :func:`agents.evaluate_against_reference` or
      ``predict``);
    - ``adapters_only=True`` (LoRA policies): the folder ``{name_prefix}_adapters_{steps}_steps``
      with the adapters, the value head and the constructor arguments, no frozen base weights and
      no optimizer state (:func:`agents.training.checkpoints.save_adapters`; load with
      :func:`agents.training.checkpoints.load_adapters`): a few MB instead of the LM's size;

    Every file is written atomically (:mod:`agents.training.atomic`: a temporary name, then a rename)
    and the checkpoint is complete only once its manifest ``{name_prefix}_manifest_{steps}_steps.json``
    (sizes and SHA-256 of its files, :mod:`agents.training.manifest`) is written, last;
    :func:`agents.latest_checkpoint` returns the newest complete one. Then this deletes the
    checkpoints (and VecNormalize / replay-buffer / training-state files of the same steps) older
    than the ``keep_last`` newest complete ones, so a kill or a failed save never costs the last
    good checkpoint. A failed save raises the ``OSError`` naming the file (disk full, permission).

    In a data-parallel run (:func:`agents.data_parallel`) every rank runs this callback: all take part
    in saving the training state, rank 0 alone writes files, and the step counts in the names are
    each rank's own (``model.num_timesteps``; the run's total is ``world_size`` times as many).

    :param save_freq: save every ``save_freq`` calls of the callback, >= 1.
    :param save_path: folder of the checkpoints (created if missing).
    :param name_prefix: file-name prefix.
    :param keep_last: how many checkpoints to keep, >= 1; ``None`` keeps all (SB3's behaviour).
    :param inference_only: save the policy alone, without optimizer state.
    :param adapters_only: save a LoRA policy's adapters and value head alone.
    :param training_state: also save the training state, at rollout boundaries.
    :param kwargs: other ``CheckpointCallback`` arguments (``save_vecnormalize``, ``verbose``, ...).
    :raises ValueError: ``save_freq`` or ``keep_last`` below 1; more than one of ``inference_only``,
        ``adapters_only``, ``training_state``; ``training_state`` with ``save_replay_buffer`` or
        ``save_vecnormalize``; (at training start) ``adapters_only`` for a policy without LoRA adapters.
    """

    def __init__(self, save_freq: int, save_path: str, name_prefix: str = "rl_model", keep_last: int | None = 3,
                 inference_only: bool = False, adapters_only: bool = False, training_state: bool = False,
                 **kwargs: Any):
        if save_freq < 1 or (keep_last is not None and keep_last < 1):
            raise ValueError(f"save_freq and keep_last must be >= 1, got {save_freq} and {keep_last}")
        if inference_only + adapters_only + training_state > 1:
            raise ValueError("inference_only, adapters_only and training_state choose what to save: pass one of them")
        if training_state and (kwargs.get("save_replay_buffer") or kwargs.get("save_vecnormalize")):
            raise ValueError("training_state=True saves on-policy runs on a DummyVecEnv; it does not combine with "
                             "save_replay_buffer or save_vecnormalize")
        super().__init__(save_freq, save_path, name_prefix, **kwargs)
        self.keep_last, self.inference_only = keep_last, inference_only
        self.adapters_only, self.training_state = adapters_only, training_state
        self._due = False

    def _init_callback(self) -> None:
        super()._init_callback()
        if self.adapters_only and getattr(self.model.policy, "peft_model", None) is None:
            raise ValueError("adapters_only=True needs a LoRA policy (policy_kwargs=dict(lora_config=...)); "
                             "use inference_only=True for a policy without adapters")
        if collectives.rank() != 0:  # the one writer of a data-parallel run
            return
        folder = Path(self.save_path)
        stale_files = [*folder.glob(f"{TEMP_PREFIX}{self.name_prefix}_*"), *folder.glob(f"{TEMP_PREFIX}old-{self.name_prefix}_*")]
        for stale in stale_files:  # left by a killed save
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            if self.training_state:
                self._due = True  # saved at the next rollout start, once PPO's update is done
            else:
                self._save()
        return True

    def _on_rollout_start(self) -> None:
        if self._due:
            self._due = False
            self._save()

    def _save(self) -> None:
        # In a data-parallel run rank 0 alone writes files, but every rank takes part in saving the
        # training state (a collective: each rank's generators and envs go into rank 0's file).
        parts = self._write_parts() if collectives.rank() == 0 else {}
        if self.training_state:
            parts["training_state"] = save_training_state(self.model, self._checkpoint_path("training_state_", extension="pkl"))
        if collectives.rank() != 0:
            return
        write_manifest(self.save_path, self.name_prefix, self.num_timesteps, parts)  # last: the set is now complete
        if self.verbose >= 2:
            print(f"Saving checkpoint to {next(iter(parts.values()))}")
        if self.keep_last is not None:
            self._prune()

    def _write_parts(self) -> dict[str, Path]:
        """Write this checkpoint's files, each atomically; kind -> path (see :class:`agents.training.manifest.Checkpoint`)."""
        if self.adapters_only:
            path = Path(self.save_path) / f"{self.name_prefix}_adapters_{self.num_timesteps}_steps"
            return {"adapters": save_adapters(self.model.policy, path)}
        if self.inference_only:
            path = Path(self._checkpoint_path("policy_", extension="pth"))
            with atomic_path(path) as temporary:
                self.model.policy.save(temporary)
            return {"policy": path}
        parts = {"model": Path(self._checkpoint_path(extension="zip"))}
        with atomic_path(parts["model"]) as temporary:  # ends in .zip, so SB3 adds no suffix of its own
            self.model.save(temporary)
        if self.save_replay_buffer and getattr(self.model, "replay_buffer", None) is not None:
            parts["replay_buffer"] = Path(self._checkpoint_path("replay_buffer_", extension="pkl"))
            with atomic_path(parts["replay_buffer"]) as temporary:
                self.model.save_replay_buffer(temporary)
        if self.save_vecnormalize and self.model.get_vec_normalize_env() is not None:
            parts["vecnormalize"] = Path(self._checkpoint_path("vecnormalize_", extension="pkl"))
            with atomic_path(parts["vecnormalize"]) as temporary:
                self.model.get_vec_normalize_env().save(temporary)
        return parts

    def checkpoints(self) -> dict[int, list[Path]]:
        """This callback's files and folders in ``save_path`` by the step count in their names, oldest first."""
        kinds = "manifest_|policy_|adapters_|training_state_|vecnormalize_|replay_buffer_"
        pattern = re.compile(rf"{re.escape(self.name_prefix)}_(?:{kinds})?(\d+)_steps(?:\.\w+)?")
        found: dict[int, list[Path]] = {}
        for path in Path(self.save_path).iterdir():
            match = pattern.fullmatch(path.name)
            if match:
                found.setdefault(int(match.group(1)), []).append(path)
        return dict(sorted(found.items()))

    def _prune(self) -> None:
        """Delete the checkpoints older than the ``keep_last`` newest *complete* ones (those with a
        manifest): an interrupted newer save never costs a complete older checkpoint."""
        steps = self.checkpoints()
        manifests = {step for step in steps if (Path(self.save_path) / manifest_name(self.name_prefix, step)).is_file()}
        complete = sorted(manifests)[-self.keep_last:]
        if len(complete) < self.keep_last:
            return
        for step, paths in steps.items():
            if step >= complete[0]:
                break
            manifest = manifest_name(self.name_prefix, step)
            # The manifest first: a kill while pruning never leaves a manifest listing deleted files.
            for path in sorted(paths, key=lambda path: path.name != manifest):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
