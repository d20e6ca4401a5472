"""The algorithms' parts around SB3's PPO: rollout buffers of whole episodes and group-relative
advantages (``buffers.py``), PPO settings for text (``defaults.py``), the KL penalty to a reference
model (``kl.py``), NLPO on sb3-contrib's ``MaskablePPO`` (``nlpo.py``) and sb3-contrib's TRPO with
one backward pass (``trpo.py``).

This floor builds on :mod:`agents.policy` and imports nothing from :mod:`agents.training`.
"""

from agents.algorithms.buffers import EpisodeRolloutBuffer, GroupRelativeRolloutBuffer
from agents.algorithms.defaults import TEXT_PPO_DEFAULTS, group_ppo_kwargs, text_ppo_kwargs
from agents.algorithms.kl import AdaptiveKLController, FixedKLController, KLPenaltyCallback
from agents.algorithms.nlpo import MaskableEpisodeRolloutBuffer, MaskableTransformerPolicy, NLPOCallback, nlpo_kwargs
from agents.algorithms.trpo import TransformerTRPO

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
