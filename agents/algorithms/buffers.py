"""Rollout buffer whose minibatches hold whole episodes."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples
from stable_baselines3.common.vec_env import VecNormalize

from agents.distributed import collectives


def storage_dtype(space: spaces.Space) -> np.dtype:
    """The smallest dtype that holds every value of an integer space exactly; other spaces keep theirs.

    ``Box`` spaces of non-negative integers (token ids, masks) get the smallest unsigned type for
    their ``high`` (``uint8`` up to 255, ``uint16`` up to 65,535, ...); ``Discrete(n)`` the
    smallest unsigned type for ``n - 1``.

    :param space: an observation or action space.
    :return: a numpy dtype.
    """
    if isinstance(space, spaces.Discrete) and space.start >= 0:
        return np.min_scalar_type(int(space.start + space.n - 1))
    if isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.integer) and space.low.min() >= 0:
        return np.min_scalar_type(int(space.high.max()))
    return space.dtype


class EpisodeRolloutBuffer(DictRolloutBuffer):
    """SB3 ``DictRolloutBuffer`` that shuffles and batches whole episode segments, not transitions.

    GAE (``compute_returns_and_advantage``) and the sample format are SB3's, unchanged. Storage
    is compact: token ids, masks and actions are kept in the smallest unsigned integer dtype that
    holds their space (:func:`storage_dtype`: ``uint16`` ids for a 49,152-token vocabulary,
    ``uint8`` masks) and handed back in the spaces' own dtypes (``int64`` ids) by every sample;
    :attr:`bytes_per_transition` reports the cost. The other difference is :meth:`get`: the buffer is cut into
    episode segments (maximal runs of one env's steps without an episode start inside; an episode
    cut by the rollout boundary gives one segment on each side), segments are shuffled with
    ``np.random`` (seeded by SB3's ``set_random_seed``, as the base class's permutation is),
    and consecutive segments are packed into a minibatch until it holds at least ``batch_size``
    transitions. So a minibatch holds ``batch_size`` to ``batch_size + T - 1`` transitions (T:
    the longest episode), and :class:`agents.TransformerPolicy` evaluates each segment with one
    forward. Pass it to SB3 as ``PPO(..., rollout_buffer_class=EpisodeRolloutBuffer)``.
    """

    def reset(self) -> None:
        """Allocate empty storage (SB3's), in the compact dtypes of :func:`storage_dtype`."""
        super().reset()
        for key, space in self.observation_space.spaces.items():
            self.observations[key] = self.observations[key].astype(storage_dtype(space))
        self.actions = self.actions.astype(storage_dtype(self.action_space))

    @property
    def bytes_per_transition(self) -> float:
        """Bytes of storage per transition: observations, action, reward, value, log-prob, GAE fields."""
        arrays = [*self.observations.values(), self.actions, self.rewards, self.returns, self.episode_starts,
                  self.values, self.log_probs, self.advantages]
        return sum(a.nbytes for a in arrays) / (self.buffer_size * self.n_envs)

    def _get_samples(self, batch_inds: np.ndarray, env: VecNormalize | None = None) -> DictRolloutBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        observations = {key: self.to_torch(obs[batch_inds].astype(self.observation_space[key].dtype))
                        for key, obs in self.observations.items()}
        return samples._replace(observations=observations)

    def get(self, batch_size: int | None = None) -> Generator[DictRolloutBufferSamples, None, None]:
        """Yield minibatches of whole episode segments.

        :param batch_size: minimum transitions per minibatch (the last one may hold fewer);
            ``None``: everything in one batch.
        :return: generator of ``DictRolloutBufferSamples`` (tensors, flattened over envs).
        """
        assert self.full, "the rollout buffer must be full before sampling"
        if not self.generator_ready:
            starts = self.episode_starts.copy()
            starts[0] = 1.0  # each env's stretch of the buffer opens a segment
            self._segment_starts = np.flatnonzero(self.swap_and_flatten(starts))
            # Same flattening as DictRolloutBuffer.get: (n_steps, n_envs, ...) -> (n_envs * n_steps, ...).
            for key, obs in self.observations.items():
                self.observations[key] = self.swap_and_flatten(obs)
            for name in ("actions", "values", "log_probs", "advantages", "returns"):
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True

        total = self.buffer_size * self.n_envs
        batch_size = total if batch_size is None else batch_size
        bounds = np.append(self._segment_starts, total)
        segments = [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        batches: list[np.ndarray] = []
        batch: list[np.ndarray] = []
        count = 0
        for k in np.random.permutation(len(segments)):
            batch.append(segments[k])
            count += len(segments[k])
            if count >= batch_size:
                batches.append(np.concatenate(batch))
                batch, count = [], 0
        if batch:
            batches.append(np.concatenate(batch))
        for indices in agreed_minibatches(batches):
            yield self._get_samples(indices)


def agreed_minibatches(batches: list[np.ndarray]) -> list[np.ndarray]:
    """``batches`` merged into as many minibatches as the rank with the fewest has (all of them in one process).

    In a data-parallel run every rank must take the same number of optimizer steps per epoch (each
    step all-reduces the gradients), but episode segments pack into a number of minibatches that
    depends on the rank's episode lengths. Neighbouring minibatches are merged
    (``np.array_split`` of the list), so every transition is still used once per epoch.

    :param batches: index arrays, one per minibatch, in order.
    :return: ``agents.distributed.agree_min(len(batches))`` index arrays.
    """
    n = collectives.agree_min(len(batches))
    if n == len(batches):
        return batches
    return [np.concatenate([batches[i] for i in chunk]) for chunk in np.array_split(np.arange(len(batches)), n)]


GROUP_BASELINES = ("rloo", "grpo")


class GroupRelativeRolloutBuffer(EpisodeRolloutBuffer):
    """:class:`EpisodeRolloutBuffer` whose advantages compare each episode with the others of its prompt.

    Replaces SB3's GAE (:meth:`compute_returns_and_advantage`) for critic-free PPO. Episodes of the
    rollout are grouped by their prompt window (the first ``prompt_length`` tokens of the
    observation, the same at every step of an episode; :class:`textgym.vec_env.GroupedPrompts`
    makes groups of envs draw the same prompts), and every step of episode ``i`` gets the advantage

    - ``"rloo"`` (Ahmadian et al. 2024, REINFORCE Leave-One-Out; Kool et al. 2019):
      ``A_i = R_i - mean_{j != i} R_j``;
    - ``"grpo"`` (Shao et al. 2024, DeepSeekMath, outcome supervision):
      ``A_i = (R_i - mean_j R_j) / (std_j R_j + eps)``, with the sample standard deviation
      (``ddof=1``, as TRL's ``GRPOTrainer``),

    where ``R_i`` is the episode's undiscounted return: the reward model's score plus, with
    :class:`agents.KLPenaltyCallback`, its per-token penalties (so the penalty keeps working; the
    callback calls this method again after rewriting the rewards). An episode counts once it ends
    inside the rollout; one that started in the previous rollout brings the rewards it collected
    there (carried over by this buffer). Steps get advantage 0 (no gradient from PPO's policy
    loss) when their episode has not ended by the rollout's last step, or when no other episode of
    the rollout shares its prompt; :attr:`group_stats` reports how many. ``returns`` are the
    Monte-Carlo returns-to-go of ended episodes and the stored values elsewhere, so a critic, if
    the policy has one, still gets a proper target and SB3's ``explained_variance`` stays
    meaningful; with ``TransformerPolicy(critic=False)`` the value loss is a constant.

    :attr:`group_stats` (``dict[str, float]``, after each rollout): ``group/episodes`` (episodes
    that ended), ``group/mean_size`` (episodes per prompt) and ``group/trained_step_fraction``
    (steps with a non-zero advantage; a group whose returns are all equal has zero advantages too).

    Use with PPO's ``normalize_advantage=False`` (per-minibatch normalisation would give the
    zero-advantage steps a gradient) and ``gamma=1``; :func:`agents.group_ppo_kwargs` sets both.

    :param buffer_size: ``n_steps`` (SB3).
    :param observation_space: a :class:`textgym.spaces.TokenWindowSpace` (needs ``prompt_length``).
    :param action_space: ``Discrete(vocab)``.
    :param device: torch device of the samples.
    :param gae_lambda: unused (there is no GAE); accepted because SB3 passes it.
    :param gamma: must be 1.0: whole episodes are compared.
    :param n_envs: number of envs.
    :param baseline: ``"rloo"`` or ``"grpo"``.
    :param eps: GRPO's ``eps`` added to the standard deviation (TRL: 1e-4).
    :raises ValueError: an unknown ``baseline``, ``gamma != 1``, or an observation space without
        ``prompt_length``.
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: str = "auto", gae_lambda: float = 1.0, gamma: float = 1.0, n_envs: int = 1,
                 baseline: str = "rloo", eps: float = 1e-4):
        if baseline not in GROUP_BASELINES:
            raise ValueError(f"baseline={baseline!r}: use one of {GROUP_BASELINES}")
        if gamma != 1.0:
            raise ValueError(f"group-relative advantages compare whole episodes' returns: use gamma=1.0, got {gamma}")
        prompt_length = getattr(observation_space, "prompt_length", None)
        if prompt_length is None:
            raise ValueError("GroupRelativeRolloutBuffer groups episodes by their prompt window: it needs "
                             "textgym's TokenWindowSpace (prompt_length) as observation space")
        self.baseline, self.eps, self.prompt_length = baseline, float(eps), int(prompt_length)
        self._carry_out = np.zeros(n_envs)
        self.group_stats: dict[str, float] = {}
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)

    def reset(self) -> None:
        """Empty the buffer; the rewards of episodes still running carry over to the next rollout."""
        super().reset()
        self._carry_in = self._carry_out.copy()

    def compute_returns_and_advantage(self, last_values, dones: np.ndarray) -> None:
        """Group-relative advantages and returns-to-go of this rollout (replaces SB3's GAE).

        :param last_values: unused (no bootstrapping: unfinished episodes get advantage 0).
        :param dones: ``(n_envs,)`` whether each env's last stored step ended its episode.
        """
        episodes, self._carry_out = self._ended_episodes(np.asarray(dones, dtype=bool))
        returns = np.array([e[3] for e in episodes], dtype=np.float64)
        advantages = np.zeros_like(returns)
        grouped = np.zeros(len(episodes), dtype=bool)
        groups: dict[bytes, list[int]] = {}
        for i, (env, t0, _, _) in enumerate(episodes):
            groups.setdefault(self._prompt_key(t0, env), []).append(i)
        for members in groups.values():
            if len(members) >= 2:
                advantages[members] = self.group_advantages(returns[members])
                grouped[members] = True

        self.advantages[:] = 0.0
        self.returns[:] = self.values
        for (env, t0, t1, _), advantage, in_group in zip(episodes, advantages, grouped):
            self.returns[t0:t1 + 1, env] = np.cumsum(self.rewards[t0:t1 + 1, env][::-1])[::-1]
            if in_group:
                self.advantages[t0:t1 + 1, env] = advantage
        sizes = [len(m) for m in groups.values()]
        self.group_stats = {
            "group/episodes": float(len(episodes)),
            "group/mean_size": float(np.mean(sizes)) if sizes else 0.0,
            "group/trained_step_fraction": float(np.mean(self.advantages != 0.0)),
        }

    def group_advantages(self, returns: np.ndarray) -> np.ndarray:
        """Advantages of one group's episodes from their returns.

        :param returns: ``float64 (k,)``, ``k >= 2`` returns of episodes of one prompt.
        :return: ``float64 (k,)``: RLOO's ``R_i - mean_{j != i} R_j`` or GRPO's
            ``(R_i - mean) / (std + eps)``.
        """
        k = len(returns)
        if self.baseline == "rloo":
            return returns - (returns.sum() - returns) / (k - 1)
        return (returns - returns.mean()) / (returns.std(ddof=1) + self.eps)

    def _ended_episodes(self, last_dones: np.ndarray) -> tuple[list[tuple[int, int, int, float]], np.ndarray]:
        """Episodes that end in this rollout and the rewards of those still running.

        :return: ``[(env, first step, last step, return)]`` (steps inclusive, return over the whole
            episode, earlier rollouts included) and ``float64 (n_envs,)`` rewards collected so far
            by each env's running episode (0 where the last step ended one).
        """
        episodes = []
        carry = np.zeros(self.n_envs)
        for env in range(self.n_envs):
            starts = list(np.flatnonzero(self.episode_starts[1:, env]) + 1)
            bounds = [0, *starts, self.buffer_size]
            before = 0.0 if self.episode_starts[0, env] else float(self._carry_in[env])
            for t0, t1 in zip(bounds[:-1], bounds[1:]):
                total = before + float(self.rewards[t0:t1, env].sum())
                before = 0.0
                if t1 < self.buffer_size or last_dones[env]:
                    episodes.append((env, t0, t1 - 1, total))
                else:
                    carry[env] = total
        return episodes, carry

    def _prompt_key(self, step: int, env: int) -> bytes:
        """The prompt window (token ids and mask) at ``(step, env)``, as bytes: equal iff same prompt."""
        ids = self.observations["input_ids"][step, env, :self.prompt_length]
        mask = self.observations["attention_mask"][step, env, :self.prompt_length]
        return ids.tobytes() + mask.tobytes()
