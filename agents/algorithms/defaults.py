"""PPO settings to start from for text generation, in one documented place."""

from __future__ import annotations

from typing import Any

from agents.algorithms.buffers import GROUP_BASELINES, EpisodeRolloutBuffer, GroupRelativeRolloutBuffer

TEXT_PPO_DEFAULTS: dict[str, Any] = dict(
    n_steps=32,            # steps per env per rollout: a couple of whole generations per env
    batch_size=128,        # minimum transitions per minibatch (whole episodes, see EpisodeRolloutBuffer);
                           # large, because every optimizer step moves all LM weights
    n_epochs=4,            # PPO epochs per rollout (Ziegler et al. 2019 use 4)
    learning_rate=1e-5,    # fine-tuning rate (TRL: 1.41e-5); with minibatches of 16, SmolLM2-135M gave approx_kl ~0.5
    gamma=1.0,             # no discount: only the finished text is scored
    gae_lambda=0.95,
    clip_range=0.2,
    ent_coef=0.0,
    vf_coef=0.1,           # the value head shares the trunk: keep its loss from dominating the LM (TRL: 0.1)
    max_grad_norm=1.0,
    target_kl=0.1,         # SB3 stops the epoch loop once approx_kl > 1.5 * target_kl
    rollout_buffer_class=EpisodeRolloutBuffer,
    # The new value head needs a far larger rate than the pretrained LM (see TransformerPolicy).
    policy_kwargs=dict(value_learning_rate=1e-4),
)
"""Keyword arguments for ``stable_baselines3.PPO`` with :class:`agents.TransformerPolicy`.

SB3's own defaults suit classic control (``n_steps=2048``, ``gamma=0.99``, ...); for text, where
an episode is one generation and each step is a transformer forward, these are the settings to
start from. SB3's defaults are left untouched; use them as ``PPO(TransformerPolicy, env,
**text_ppo_kwargs(learning_rate=2e-5))``.
"""


def text_ppo_kwargs(**overrides: Any) -> dict[str, Any]:
    """:data:`TEXT_PPO_DEFAULTS` updated with ``overrides`` (a new dict; the defaults stay as they are).

    ``policy_kwargs`` are merged key by key, so ``policy_kwargs=dict(model_name_or_path=...)``
    keeps the default ``value_learning_rate``.

    :raises TypeError: an override that ``stable_baselines3.PPO`` does not accept.
    """
    import inspect

    from stable_baselines3 import PPO

    accepted = set(inspect.signature(PPO.__init__).parameters)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise TypeError(f"stable_baselines3.PPO has no parameter(s) {unknown}")
    policy_kwargs = {**TEXT_PPO_DEFAULTS["policy_kwargs"], **(overrides.pop("policy_kwargs", None) or {})}
    return {**TEXT_PPO_DEFAULTS, **overrides, "policy_kwargs": policy_kwargs}


def group_ppo_kwargs(baseline: str = "grpo", **overrides: Any) -> dict[str, Any]:
    """:func:`text_ppo_kwargs` for critic-free PPO with group-relative advantages (RLOO or GRPO).

    Sets ``rollout_buffer_class=GroupRelativeRolloutBuffer`` with ``baseline``,
    ``normalize_advantage=False`` (the buffer's zero advantages must stay zero; GRPO normalises
    per group already), ``vf_coef=0`` and ``policy_kwargs=dict(critic=False)``, then applies
    ``overrides`` as :func:`text_ppo_kwargs` does. Wrap the envs in
    :class:`textgym.vec_env.GroupedPrompts` so that each prompt is sampled by several envs.

    :param baseline: ``"rloo"`` or ``"grpo"`` (see :class:`agents.GroupRelativeRolloutBuffer`).
    :raises ValueError: an unknown ``baseline``.
    :raises TypeError: an override that ``stable_baselines3.PPO`` does not accept.
    """
    if baseline not in GROUP_BASELINES:
        raise ValueError(f"baseline={baseline!r}: use one of {GROUP_BASELINES}")
    policy_kwargs = {"critic": False, **(overrides.pop("policy_kwargs", None) or {})}
    group = dict(rollout_buffer_class=GroupRelativeRolloutBuffer, rollout_buffer_kwargs=dict(baseline=baseline),
                 normalize_advantage=False, vf_coef=0.0)
    return text_ppo_kwargs(**{**group, **overrides, "policy_kwargs": policy_kwargs})
