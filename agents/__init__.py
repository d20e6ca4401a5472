"""agents: the learning side of textgym, built on upstream Stable-Baselines3.

- :class:`TransformerPolicy`: SB3 ``ActorCriticPolicy`` around a Hugging Face causal LM.
- :class:`EpisodeRolloutBuffer`: minibatches of whole episodes, one transformer forward each.
- :func:`text_ppo_kwargs`: PPO settings to start from for text.
- :class:`GroupRelativeRolloutBuffer`, :func:`group_ppo_kwargs`: critic-free PPO with RLOO or GRPO advantages.
- :class:`KLPenaltyCallback`: per-token KL penalty to a frozen reference model (fixed or adaptive).
- :class:`MaskableTransformerPolicy`, :class:`MaskableEpisodeRolloutBuffer`, :class:`NLPOCallback`,
  :func:`nlpo_kwargs`: NLPO (PPO within a learned top-p mask) on sb3-contrib's ``MaskablePPO``.
- :class:`TransformerTRPO`: sb3-contrib's ``TRPO`` with its actor gradients in one backward pass.
- :func:`adapters_disabled`, :func:`merged_lm`, :func:`save_adapters`, :func:`load_adapters`: LoRA adapters
  (``policy_kwargs=dict(lora_config=...)``); adapters-only checkpoints.
- :func:`save_training_state`, :func:`load_training_state`: exact resume (what ``model.save`` does not keep).
- :func:`evaluate_against_reference`, :func:`sample_episodes`: held-out reward, KL, perplexity and diversity, trained vs reference.
- :class:`SampleTextCallback`: sampled prompts, completions and rewards in TensorBoard and on the console.
- :class:`RollingCheckpointCallback`: the last K checkpoints; without optimizer state, adapters only, or resumable.
- :func:`latest_checkpoint`, :func:`verify_checkpoint`, :class:`Checkpoint`: the newest complete checkpoint,
  its files checked against their manifest (written atomically, so a kill or a full disk loses nothing saved);
  :func:`resume_latest` loads it (zip and training state), :func:`load_algorithm` loads a zip naming what failed.
- :func:`export_pretrained`: a Hugging Face model directory (LM, tokenizer, value head, model card).
- :func:`data_parallel`, :func:`local_device`: one run across the ranks of a ``torchrun`` launch (DD-PPO on
  ``torch.distributed``), a no-op in one process.

The modules stand on three floors, each importing only from the floors below it:
:mod:`agents.policy` (the policy and what it is made of), :mod:`agents.algorithms` (the algorithms'
parts) and :mod:`agents.training` (training operations: callbacks, checkpoints, evaluation, resume,
export). ``import agents`` imports neither sb3-contrib nor peft nor rl-baselines3-zoo: the NLPO and
TRPO names are imported from their modules on first access, and peft only when a policy gets adapters.

:mod:`agents.training.zoo` (rl-baselines3-zoo support: yaml-friendly callbacks, a tuning sampler for
text, a replay) is not imported here. :mod:`agents.zoo` is the zoo's entry point: importing it puts
the text sampler in the zoo's PPO sampler table, and ``python -m agents.zoo`` replays a zoo-trained model.
"""

from agents import algorithms
from agents.algorithms import (TEXT_PPO_DEFAULTS, AdaptiveKLController, EpisodeRolloutBuffer, FixedKLController,
                               GroupRelativeRolloutBuffer, KLPenaltyCallback, group_ppo_kwargs, text_ppo_kwargs)
from agents.policy import CausalLMExtractor, TransformerPolicy, adapters_disabled, load_causal_lm, merged_lm
from agents.training import (Checkpoint, RollingCheckpointCallback, SampleTextCallback, TextEvaluation,
                             data_parallel, evaluate_against_reference, export_pretrained, latest_checkpoint, load_adapters,
                             load_algorithm, load_training_state, local_device, resume_latest, sample_episodes, save_adapters,
                             save_training_state, verify_checkpoint)
from textgym import _lazy, _moved

_MOVED = {
    "agents.buffers": "agents.algorithms.buffers",
    "agents.defaults": "agents.algorithms.defaults",
    "agents.kl": "agents.algorithms.kl",
    "agents.nlpo": "agents.algorithms.nlpo",
    "agents.trpo": "agents.algorithms.trpo",
    "agents.extractor": "agents.policy.extractor",
    "agents.kv_cache": "agents.policy.kv_cache",
    "agents.lora": "agents.policy.lora (save_adapters, load_adapters: agents.training.checkpoints)",
    "agents.precision": "agents.policy.precision",
    "agents.prefix_sharing": "agents.policy.prefix_sharing",
    "agents.callbacks": "agents.training.callbacks",
    "agents.evaluation": "agents.training.evaluation",
    "agents.export": "agents.training.export",
    "agents.resume": "agents.training.resume",
}
"""Old module path (before the modules were arranged by role) -> where its contents are now."""

_moved.install(_MOVED)  # importing an old module path (agents.kl, ...) names its new place

__all__ = [
    "TEXT_PPO_DEFAULTS",
    "AdaptiveKLController",
    "FixedKLController",
    "KLPenaltyCallback",
    "MaskableEpisodeRolloutBuffer",
    "MaskableTransformerPolicy",
    "NLPOCallback",
    "RollingCheckpointCallback",
    "SampleTextCallback",
    "CausalLMExtractor",
    "Checkpoint",
    "EpisodeRolloutBuffer",
    "GroupRelativeRolloutBuffer",
    "TransformerPolicy",
    "TransformerTRPO",
    "TextEvaluation",
    "adapters_disabled",
    "data_parallel",
    "evaluate_against_reference",
    "export_pretrained",
    "group_ppo_kwargs",
    "latest_checkpoint",
    "load_adapters",
    "load_algorithm",
    "load_causal_lm",
    "load_training_state",
    "local_device",
    "merged_lm",
    "nlpo_kwargs",
    "resume_latest",
    "sample_episodes",
    "save_adapters",
    "save_training_state",
    "text_ppo_kwargs",
    "verify_checkpoint",
]


# PEP 562: the names whose modules need sb3-contrib (agents.algorithms.NEEDS_SB3_CONTRIB), on first access.
__getattr__ = _lazy.lazy_names(__name__, algorithms.NEEDS_SB3_CONTRIB)
