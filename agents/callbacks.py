"""Callbacks for watching text training: sampled completions in TensorBoard and on the console."""

from __future__ import annotations

import math
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback


class SampleTextCallback(BaseCallback):
    """Show a few prompts, completions and rewards from the rollouts while PPO trains (SB3 callback).

    Reward curves say *that* a text policy changed; samples say *how* (a reward model being gamed
    shows here first). Every ``every`` rollouts, the first ``n_samples`` episodes that finish
    during that rollout are recorded as one markdown table — prompt, completion, and every entry of
    ``info["reward_components"]`` (the env's reward before any KL penalty) — under ``samples/text``
    with SB3's logger, which writes strings to TensorBoard's text tab at the current timestep, and
    printed to the console when ``verbose >= 1``.

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
            if self.verbose >= 1:
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
