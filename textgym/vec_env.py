"""Groups of envs that draw the same prompts, for group-relative advantages (RLOO, GRPO)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn


class GroupedPrompts(VecEnvWrapper):
    """SB3 ``VecEnv`` wrapper: envs ``g*k .. g*k + k - 1`` form group ``g`` and get the same prompts.

    RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024) sample ``k`` completions of each
    prompt and take the other samples' rewards as the baseline. Here a group's ``k`` envs are
    seeded alike, so their ``j``-th episodes start from the same prompt (or, for
    :class:`textgym.DialogueEnv` and ``TextArena-v0``, the same game seed): every textgym env draws
    its prompt, and nothing else, from ``self.np_random`` at ``reset``. The envs run
    independently, so a group's episodes end at different steps when their lengths differ;
    :class:`agents.GroupRelativeRolloutBuffer` groups the episodes of a rollout by their prompt
    tokens, not by time.

    Seeding: ``seed(s)`` (SB3's ``PPO(..., seed=s)`` calls it) gives group ``g`` the seed
    ``s + g`` at the next ``reset``; without a seed, one is drawn from the OS's entropy at
    construction, so the groups are formed either way. The inner VecEnv's own per-env seeding
    (``s + i`` for env ``i``) is overridden: the first ``reset`` after seeding resets the inner
    VecEnv, then resets each env again with its group's seed (``env_method("reset", seed=...)``)
    and returns those observations.

    :param venv: the vectorised envs (``DummyVecEnv`` or ``SubprocVecEnv``), e.g. from
        ``make_vec_env("TextGen-v0", n_envs=8)``.
    :param group_size: ``k``, envs per group, >= 2, dividing ``venv.num_envs``.
    :param seed: base seed of the groups (group ``g`` gets ``seed + g``); ``None``: random.
    :raises ValueError: ``group_size`` < 2 or not a divisor of the number of envs.
    """

    def __init__(self, venv: VecEnv, group_size: int, seed: int | None = None):
        if group_size < 2 or venv.num_envs % group_size:
            raise ValueError(f"group_size={group_size} must be >= 2 and divide the {venv.num_envs} envs; "
                             f"use n_envs = group_size x (number of groups)")
        super().__init__(venv)
        self.group_size = group_size
        self._pending_seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)

    @property
    def n_groups(self) -> int:
        """Number of groups, ``num_envs // group_size``."""
        return self.num_envs // self.group_size

    def group_of(self, env_index: int) -> int:
        """The group of env ``env_index``: ``env_index // group_size``."""
        return env_index // self.group_size

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the groups at the next ``reset``: env ``i`` gets ``seed + i // group_size``.

        :param seed: base seed; ``None``: random.
        :return: the per-env seeds, ``list[int]`` of length ``num_envs``.
        """
        self._pending_seed = int(np.random.default_rng().integers(2**31)) if seed is None else int(seed)
        return [self._pending_seed + self.group_of(i) for i in range(self.num_envs)]

    def reset(self) -> VecEnvObs:
        """Reset every env; after ``seed`` (or construction), then seed each group's envs alike.

        :return: the first observations, as the inner VecEnv returns them (``reset_infos`` holds
            the infos of the seeded resets).
        """
        obs = self.venv.reset()  # also spends any seeds the inner VecEnv still holds (make_vec_env's s + i)
        self.reset_infos = list(self.venv.reset_infos)
        if self._pending_seed is not None:
            for i in range(self.num_envs):
                env_obs, self.reset_infos[i] = self.venv.env_method(
                    "reset", seed=self._pending_seed + self.group_of(i), indices=[i])[0]
                _set_row(obs, i, env_obs)
            self._pending_seed = None
        return obs

    def step_wait(self) -> VecEnvStepReturn:
        """The inner VecEnv's step, unchanged."""
        return self.venv.step_wait()


def _set_row(obs: VecEnvObs, index: int, env_obs) -> None:
    """Write one env's observation into row ``index`` of a VecEnv observation (array or dict of arrays)."""
    if isinstance(obs, dict):
        for key, value in obs.items():
            value[index] = env_obs[key]
    else:
        obs[index] = env_obs
