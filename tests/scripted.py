"""Scripted episode ends for tests whose point needs episodes of different lengths.

A premise such as "episodes end at different steps" must not hang on which tokens a seed happens
to sample: on a machine whose float rounding differs the sampled tokens differ. :func:`script_stops`
makes the length of every episode a function of its prompt alone, whatever the policy's weights.
"""

from __future__ import annotations

import torch
from sb3_contrib.common.maskable.distributions import MaskableDistribution
from stable_baselines3.common.distributions import Distribution

EOS = 2  # the tiny tokenizer's <eos>


def script_stops(monkeypatch, policy, stop_at=len, stop_ids=(EOS,)) -> None:
    """Make every episode of ``policy``'s text envs end with EOS as its ``stop_at(prompt_ids)``-th token.

    Actions are still drawn from the policy's (masked) distribution, sampled or greedy, through
    every path that draws them: ``forward`` (rollouts, ``CachedSampler``, evaluation waves) and
    ``get_distribution`` (``predict``); but with the ``stop_ids`` taken out of the distribution,
    except at the scripted step, where the action is EOS. The log-probs the policy reports are
    those of the actions taken, so exactness checks still hold. A ``stop_at`` above the env's
    ``max_new_tokens`` means the episode runs to that limit. Patches the policy's class (so a
    reference copy made of it follows the same script) until the test ends.

    :param stop_at: prompt token ids (a list) -> the step that emits EOS (1 = the first token).
    :param stop_ids: the env's stop tokens, never drawn but at the scripted step; holds EOS.
    """
    prompt_length = policy.observation_space.prompt_length
    stop_ids = list(stop_ids)
    pending: list[torch.Tensor] = []

    def forced_eos(obs) -> torch.Tensor:
        ids, mask = obs["input_ids"], obs["attention_mask"].bool()
        generated = mask[:, prompt_length:].sum(-1)
        stops = [stop_at(row[row_mask].tolist()) for row, row_mask in zip(ids[:, :prompt_length], mask[:, :prompt_length])]
        return generated + 1 == torch.as_tensor(stops, device=generated.device)

    cls = type(policy)
    real_forward, real_get_distribution = cls.forward, cls.get_distribution

    def forward(self, obs, *args, **kwargs):
        pending.append(forced_eos(obs))
        try:
            return real_forward(self, obs, *args, **kwargs)
        finally:
            pending.pop()

    def get_distribution(self, obs, *args, **kwargs):
        distribution = real_get_distribution(self, obs, *args, **kwargs)
        distribution.scripted_eos = forced_eos(obs)
        return distribution

    def scripted_get_actions(real):
        def get_actions(self, deterministic: bool = False):
            # SB3 reuses one distribution object per policy: the mark of get_distribution is used once.
            marked = self.__dict__.pop("scripted_eos", None)
            forced = pending[-1] if pending else marked
            if forced is None:
                return real(self, deterministic)
            probs = self.distribution.probs.clone()
            if len(forced) != len(probs):
                raise AssertionError(f"scripted stops for {len(forced)} rows, distribution of {len(probs)}")
            probs[:, stop_ids] = 0.0
            if not (probs.sum(-1) > 0).all():
                raise AssertionError("a row allows no token but the stop tokens: the script cannot continue it")
            actions = probs.argmax(-1) if deterministic else torch.multinomial(probs, 1).squeeze(-1)
            return torch.where(forced, torch.full_like(actions, EOS), actions)
        return get_actions

    monkeypatch.setattr(cls, "forward", forward)
    monkeypatch.setattr(cls, "get_distribution", get_distribution)
    monkeypatch.setattr(Distribution, "get_actions", scripted_get_actions(Distribution.get_actions))
    monkeypatch.setattr(MaskableDistribution, "get_actions", scripted_get_actions(MaskableDistribution.get_actions))
