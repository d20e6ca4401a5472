"""SB3 ``VecEnv`` wrappers for text envs.

- :class:`GroupedPrompts`: groups of envs that draw the same prompts, for group-relative
  advantages (RLOO, GRPO).
- :class:`BatchedRewards`: one reward-model call per step for every episode that ends in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn


class GroupedPrompts(VecEnvWrapper):
    """SB3 ``VecEnv`` wrapper: envs ``g*k`` to ``g*k + k - 1`` form group ``g`` and get the same prompts.

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


class BatchedRewards(VecEnvWrapper):
    """SB3 ``VecEnv`` wrapper: every episode that ends at a step is scored in one reward-model call.

    Without it, each :class:`textgym.TextGenEnv` scores its own text when it ends
    (``reward_model([prompt], [completion])``): with 8 envs finishing together, 8 calls of one
    text each. With it, ``step_async`` first asks every env which text its action would finish
    (:meth:`textgym.TextGenEnv.text_to_score`), calls each distinct reward model once on all of
    them, hands each env its score (:meth:`~textgym.TextGenEnv.provide_score`), and only then
    steps the envs. The envs still return the reward at their own step, so ``Monitor``,
    ``VecMonitor``, the KL callback and every other consumer see the same rewards and infos as
    without the wrapper; users' own reward callables receive the whole batch. The scores are
    those of one call per text up to the reward model's batch arithmetic (a transformer reward
    model pads the batch: float rounding, ~1e-6).

    Works for in-process envs (``DummyVecEnv``, the default of ``make_vec_env``, possibly under
    other VecEnv wrappers), where all envs built with the same ``reward_model`` share one
    instance (:func:`textgym.rewards.as_reward_fn`); envs with different reward models are
    scored one call per model.

    :param venv: vectorised :class:`textgym.TextGenEnv` envs, e.g. ``make_vec_env("TextGen-v0", n_envs=8)``.
    :raises ValueError: the envs run in subprocesses (``SubprocVecEnv``: scoring there would copy the
        reward model into this process), or are not text envs with ``text_to_score``
        (``TextGen-Dialogue-v0`` games score their own turns).
    """

    def __init__(self, venv: VecEnv):
        from stable_baselines3.common.vec_env import DummyVecEnv

        if not isinstance(venv.unwrapped, DummyVecEnv):
            raise ValueError(f"BatchedRewards scores in this process: it needs DummyVecEnv envs, got "
                             f"{type(venv.unwrapped).__name__}; use make_vec_env(..., vec_env_cls=DummyVecEnv)")
        if not venv.has_attr("text_to_score"):
            raise ValueError("BatchedRewards needs text envs that score a finished text (TextGen-v0 and its tasks), "
                             "with text_to_score/provide_score")
        super().__init__(venv)
        self._by_model: dict[int, tuple[object, list[int]]] = {}
        for i, fn in enumerate(venv.get_attr("reward_fn")):
            self._by_model.setdefault(id(fn), (fn, []))[1].append(i)
        self.reward_calls = 0  # reward-model calls so far (a count for tests and benchmarks)

    def step_async(self, actions: np.ndarray) -> None:
        """Score the texts these actions finish (one call per reward model), then step the envs."""
        from textgym.rewards import reward_components

        texts = {i: self.venv.env_method("text_to_score", actions[i], indices=[i])[0] for i in range(self.num_envs)}
        for reward_fn, indices in self._by_model.values():
            ending = [i for i in indices if texts[i] is not None]
            if not ending:
                continue
            prompts, completions = zip(*(texts[i] for i in ending))
            components = reward_components(reward_fn(list(prompts), list(completions)), len(ending))
            self.reward_calls += 1
            for k, i in enumerate(ending):
                self.venv.env_method("provide_score", {name: float(v[k]) for name, v in components.items()},
                                     indices=[i])
        self.venv.step_async(actions)

    def step_wait(self) -> VecEnvStepReturn:
        """The inner VecEnv's step, unchanged."""
        return self.venv.step_wait()

    def reset(self) -> VecEnvObs:
        """The inner VecEnv's reset, unchanged."""
        return self.venv.reset()
