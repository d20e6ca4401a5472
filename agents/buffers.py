"""Rollout buffer whose minibatches hold whole episodes."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from gymnasium import spaces
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples
from stable_baselines3.common.vec_env import VecNormalize


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
        batch: list[np.ndarray] = []
        count = 0
        for k in np.random.permutation(len(segments)):
            batch.append(segments[k])
            count += len(segments[k])
            if count >= batch_size:
                yield self._get_samples(np.concatenate(batch))
                batch, count = [], 0
        if batch:
            yield self._get_samples(np.concatenate(batch))
