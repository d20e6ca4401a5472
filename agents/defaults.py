"""PPO settings to start from for text generation, in one documented place."""

from __future__ import annotations

from typing import Any

from agents.buffers import EpisodeRolloutBuffer

TEXT_PPO_DEFAULTS: dict[str, Any] = dict(
    n_steps=64,            # steps per env per rollout: a few whole generations per env
    batch_size=64,         # minimum transitions per minibatch (whole episodes, see EpisodeRolloutBuffer)
    n_epochs=4,            # PPO epochs per rollout (Ziegler et al. 2019 use 4)
    learning_rate=1e-5,    # fine-tuning rate for a pretrained LM (TRL's PPO uses 1.41e-5)
    gamma=1.0,             # no discount: only the finished text is scored
    gae_lambda=0.95,
    clip_range=0.2,
    ent_coef=0.0,
    vf_coef=0.1,           # the value head shares the trunk: keep its loss from dominating the LM (TRL: 0.1)
    max_grad_norm=1.0,
    rollout_buffer_class=EpisodeRolloutBuffer,
)
"""Keyword arguments for ``stable_baselines3.PPO`` with :class:`agents.TransformerPolicy`.

SB3's own defaults suit classic control (``n_steps=2048``, ``gamma=0.99``, ...); for text, where
an episode is one generation and each step is a transformer forward, these are the settings to
start from. SB3's defaults are left untouched; use them as ``PPO(TransformerPolicy, env,
**text_ppo_kwargs(learning_rate=2e-5))``.
"""


def text_ppo_kwargs(**overrides: Any) -> dict[str, Any]:
    """:data:`TEXT_PPO_DEFAULTS` updated with ``overrides`` (a new dict; the defaults stay as they are).

    :raises TypeError: an override that ``stable_baselines3.PPO`` does not accept.
    """
    import inspect

    from stable_baselines3 import PPO

    accepted = set(inspect.signature(PPO.__init__).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"stable_baselines3.PPO has no parameter(s) {unknown}")
    return {**TEXT_PPO_DEFAULTS, **overrides}
