"""LoRA adapters for :class:`agents.TransformerPolicy`, through Hugging Face ``peft``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes the pretrained
weights ``W`` and trains a low-rank update: a targeted linear layer computes
``W x + (alpha / r) * B A x`` with ``A: (r, in)``, ``B: (out, r)`` and ``B = 0`` at the start, so
the adapted model starts as exactly the pretrained one. ``peft`` (``get_peft_model``) injects the
adapter layers *in place* into the transformers model, so the policy keeps using the transformers
model itself (``policy.lm``; its trunk is still ``policy.lm.base_model``) and keeps the
``peft.PeftModel`` wrapper beside it (``policy.peft_model``) for what only peft knows:
``disable_adapter()`` (the frozen pretrained model, used as the KL reference without a second copy),
``save_pretrained`` of the adapters alone, and ``merge_and_unload``.

Saving the trained LM:

- the policy from its adapters (a few MB instead of the whole LM):
  :func:`agents.training.checkpoints.save_adapters` writes peft's adapter files, the value head and
  the policy's constructor arguments; :func:`agents.training.checkpoints.load_adapters` rebuilds the
  policy from the base model and gives the same logits;
- adapters only (a few MB): ``policy.peft_model.save_pretrained(path)``; load with
  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)``;
- a plain transformers model with the adapters merged into ``W``: ``merged_lm(policy).save_pretrained(path)``
  (a merged copy; the policy keeps its adapters). ``policy.lm.save_pretrained`` itself would write
  peft's renamed layers (``...c_attn.base_layer.weight``), which ``from_pretrained`` does not read
  back as the original architecture.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
from collections.abc import Iterator, Mapping
from typing import Any

import torch as th

_NOT_KWARGS = {"peft_type", "peft_version", "runtime_config", "auto_mapping", "base_model_name_or_path", "revision"}


def lora_config_dict(lora_config: Any) -> dict[str, Any]:
    """A ``peft.LoraConfig`` (or a dict of its keyword arguments) as a plain, picklable dict.

    Every ``LoraConfig`` argument is kept, defaults included, so a later peft with other defaults
    rebuilds the same adapters (and one without an argument fails loudly); sets become sorted
    lists and enums their values, so the dict survives SB3's ``save``/``load`` (JSON or pickle)
    and ``LoraConfig(**lora_config_dict(c))`` rebuilds ``c``.

    :param lora_config: ``peft.LoraConfig`` or ``dict`` of ``LoraConfig`` keyword arguments.
    :return: ``dict[str, Any]`` of keyword arguments.
    :raises TypeError: not a ``LoraConfig`` or mapping, or an argument ``LoraConfig`` does not take.
    :raises ValueError: a value ``LoraConfig`` rejects (e.g. ``r <= 0``).
    """
    from peft import LoraConfig

    if isinstance(lora_config, Mapping):
        config = LoraConfig(**dict(lora_config))  # TypeError for an unknown argument
    elif isinstance(lora_config, LoraConfig):
        config = lora_config
    else:
        raise TypeError(f"lora_config must be a peft.LoraConfig or a dict of its arguments, got "
                        f"{type(lora_config).__name__}")
    return {field.name: _plain(getattr(config, field.name)) for field in dataclasses.fields(LoraConfig)
            if field.init and field.name not in _NOT_KWARGS}


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def add_lora(lm: th.nn.Module, lora_config: Mapping[str, Any], model_name: str = "the model"):
    """Inject LoRA adapters into ``lm`` in place and freeze its pretrained weights (``peft.get_peft_model``).

    After the call ``lm``'s own parameters have ``requires_grad=False`` except the adapters'
    (``lora_A``/``lora_B``, and what the config adds: ``modules_to_save``, ``bias``); ``lm``'s
    outputs are unchanged until the adapters train (peft initialises ``B = 0``).

    :param lm: a transformers causal LM (``PreTrainedModel``), modified in place.
    :param lora_config: keyword arguments of ``peft.LoraConfig`` (see :func:`lora_config_dict`).
    :param model_name: name used in error messages.
    :return: the ``peft.PeftModel`` wrapping ``lm`` (``peft_model.base_model.model is lm``).
    :raises ValueError: ``target_modules`` (or another selector) matches no layer of ``lm``; the
        message lists the names of the layers that can be targeted.
    """
    from peft import LoraConfig, get_peft_model

    try:
        return get_peft_model(lm, LoraConfig(**lora_config))
    except ValueError as error:  # peft's NoMatchingPeftModuleError is a ValueError
        if "not found in the base model" not in str(error) and "No modules were targeted" not in str(error):
            raise
        raise ValueError(f"lora_config={dict(lora_config)!r} targets no layer of {model_name}: {error} "
                         f"Layers LoRA can target here (target_modules): {sorted(_linear_names(lm))}") from error


def _linear_names(lm: th.nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {name.rsplit(".", 1)[-1] for name, module in lm.named_modules()
            if isinstance(module, (th.nn.Linear, Conv1D)) and name}


@contextlib.contextmanager
def adapters_disabled(policy) -> Iterator[th.nn.Module]:
    """Context in which ``policy.lm`` computes the pretrained model: peft's ``disable_adapter()``.

    Everything that runs ``policy.lm`` inside the context (``predict``, the KL reference forward,
    evaluation) sees the frozen base weights alone; the adapters come back on exit, also on error.

    :param policy: a :class:`agents.TransformerPolicy` built with ``lora_config``.
    :return: (yields) ``policy.lm``.
    :raises ValueError: the policy has no LoRA adapters.
    """
    peft_model = getattr(policy, "peft_model", None)
    if peft_model is None:
        raise ValueError("the policy has no LoRA adapters (build it with policy_kwargs=dict(lora_config=...))")
    with peft_model.disable_adapter():  # the rollout KV cache sees the toggle (agents.policy.kv_cache.adapters_state)
        yield policy.lm


def merged_lm(policy) -> th.nn.Module:
    """A copy of the policy's LM with the LoRA update merged into its weights (peft's ``merge_and_unload``).

    ``W <- W + (alpha / r) B A`` on a deep copy, so the policy keeps training with its adapters;
    the result is a plain transformers model (``save_pretrained`` / ``from_pretrained`` as usual).
    Costs one extra copy of the LM in memory while it lives.

    :param policy: a :class:`agents.TransformerPolicy` built with ``lora_config``.
    :return: ``PreTrainedModel`` of the base architecture, eval mode.
    :raises ValueError: the policy has no LoRA adapters.
    """
    peft_model = getattr(policy, "peft_model", None)
    if peft_model is None:
        raise ValueError("the policy has no LoRA adapters; save policy.lm directly")
    return copy.deepcopy(peft_model).merge_and_unload().eval()
