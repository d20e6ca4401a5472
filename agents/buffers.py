"""Rollout buffer whose minibatches hold whole episodes."""

from __future__ import annotations

from collections.abc import Generator

import numpy as np
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples


class EpisodeRolloutBuffer(DictRolloutBuffer):
    """SB3 ``DictRolloutBuffer`` that shuffles and batches whole episode segments, not transitions.

    Storage, GAE (``compute_returns_and_advantage``) and sample format are SB3's, unchanged;
    observations keep the space's integer dtypes. Only :meth:`get` differs: the buffer is cut into
    episode segments (maximal runs of one env's steps without an episode start inside; an episode
    cut by the rollout boundary gives one segment on each side), segments are shuffled with
    ``np.random`` (seeded by SB3's ``set_random_seed``, as the base class's permutation is),
    and consecutive segments are packed into a minibatch until it holds at least ``batch_size``
    transitions. So a minibatch holds ``batch_size`` to ``batch_size + T - 1`` transitions (T:
    the longest episode), and :class:`agents.TransformerPolicy` evaluates each segment with one
    forward. Pass it to SB3 as ``PPO(..., rollout_buffer_class=EpisodeRolloutBuffer)``.
    """

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
