"""The policy and what it is made of: :class:`TransformerPolicy` (``policy.py``) around a causal LM
(``extractor.py``), with KV-cached rollouts (``kv_cache.py``), one forward per episode and one per
shared prompt prefix (``prefix_sharing.py``), activation checkpointing in eval mode
(``checkpointing.py``), low-precision training (``precision.py``) and LoRA adapters (``lora.py``).

This floor imports nothing from :mod:`agents.algorithms` or :mod:`agents.training`.
"""

from agents.policy.extractor import CausalLMExtractor, load_causal_lm
from agents.policy.lora import adapters_disabled, merged_lm
from agents.policy.policy import TransformerPolicy

__all__ = ["CausalLMExtractor", "TransformerPolicy", "adapters_disabled", "load_causal_lm", "merged_lm"]
