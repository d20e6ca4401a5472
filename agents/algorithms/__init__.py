"""The algorithms' parts around SB3's PPO: rollout buffers of whole episodes and group-relative
advantages (``buffers.py``), PPO settings for text (``defaults.py``), the KL penalty to a reference
model (``kl.py``), NLPO on sb3-contrib's ``MaskablePPO`` (``nlpo.py``) and sb3-contrib's TRPO with
one backward pass (``trpo.py``).

This floor builds on :mod:`agents.policy` and imports nothing from :mod:`agents.training`.
"""

from agents.algorithms.buffers import EpisodeRolloutBuffer, GroupRelativeRolloutBuffer
from agents.algorithms.defaults import TEXT_PPO_DEFAULTS, group_ppo_kwargs, text_ppo_kwargs
from agents.algorithms.kl import AdaptiveKLController, FixedKLController, KLPenaltyCallback
from textgym._lazy import lazy_names

NEEDS_SB3_CONTRIB = {
    "MaskableEpisodeRolloutBuffer": "agents.algorithms.nlpo",
    "MaskableTransformerPolicy": "agents.algorithms.nlpo",
    "NLPOCallback": "agents.algorithms.nlpo",
    "nlpo_kwargs": "agents.algorithms.nlpo",
    "TransformerTRPO": "agents.algorithms.trpo",
}
"""Public name -> its module, imported on first access: these modules import sb3-contrib, which a
PPO run does not need."""

__all__ = [
    "TEXT_PPO_DEFAULTS",
    "AdaptiveKLController",
    "EpisodeRolloutBuffer",
    "FixedKLController",
    "GroupRelativeRolloutBuffer",
    "KLPenaltyCallback",
    "MaskableEpisodeRolloutBuffer",
    "MaskableTransformerPolicy",
    "NLPOCallback",
    "TransformerTRPO",
    "group_ppo_kwargs",
    "nlpo_kwargs",
    "text_ppo_kwargs",
]


__getattr__ = lazy_names(__name__, NEEDS_SB3_CONTRIB)  # PEP 562: those names on first access
