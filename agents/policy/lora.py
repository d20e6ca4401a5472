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

- the policy from its adapters (a few MB instead of the whole LM): :func:`save_adapters` writes
  peft's adapter files, the value head and the policy's constructor arguments; :func:`load_adapters`
  rebuilds the policy from the base model and gives the same logits;
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
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
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


POLICY_CONFIG_FILE = "policy_config.pth"
"""The policy's constructor arguments in an adapters checkpoint (``torch.save``, as SB3's ``policy.save``)."""

HEADS_FILE = "policy_heads.safetensors"
"""The policy's weights outside its LM (value head, ``net_arch`` value layers) in an adapters
checkpoint, under their ``policy.state_dict()`` names."""

_LM_PREFIXES = ("features_extractor.", "pi_features_extractor.", "vf_features_extractor.", "action_net.")
"""``state_dict`` prefixes of the LM: SB3 lists the shared trunk under three names, its head as ``action_net``."""


def save_adapters(policy, path: str | os.PathLike) -> Path:
    """Write a LoRA policy without its frozen base weights: a folder that :func:`load_adapters` reads.

    SB3's ``model.save`` and ``policy.save`` write the whole ``state_dict``, frozen base LM included
    (517 MiB for SmolLM2-135M with r=16 adapters); this writes what differs from the base model:

    - ``adapter_config.json``, ``adapter_model.safetensors``: peft's ``save_pretrained`` of the
      adapters (also loadable with ``peft.PeftModel.from_pretrained(base_lm, path)``);
    - :data:`HEADS_FILE`: the value head (and ``net_arch`` value layers), float tensors by their
      ``policy.state_dict()`` names; empty for ``critic=False``;
    - :data:`POLICY_CONFIG_FILE`: the constructor arguments (``_get_constructor_parameters``, as
      SB3's ``policy.save`` stores them: the base model's id or path, the spaces, ``lora_config``, ...).

    The base model itself is not written: loading needs it under the same id or path
    (``policy.model_name_or_path``). No optimizer state is kept (an inference or export
    checkpoint, like ``RollingCheckpointCallback(inference_only=True)``).

    :param policy: a :class:`agents.TransformerPolicy` built with ``lora_config``.
    :param path: folder to write (created; files of the same names are replaced).
    :return: the folder.
    :raises ValueError: the policy has no LoRA adapters.
    """
    import torch
    from safetensors.torch import save_file

    peft_model = getattr(policy, "peft_model", None)
    if peft_model is None:
        raise ValueError("the policy has no LoRA adapters, so there is nothing smaller to save; "
                         "use policy.save(path) (TransformerPolicy.load reads it)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(path, save_embedding_layers=False)  # the base LM's layers are never resized here
    heads = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()
             if not name.startswith(_LM_PREFIXES)}
    save_file(heads, path / HEADS_FILE)
    torch.save({"data": policy._get_constructor_parameters()}, path / POLICY_CONFIG_FILE)
    return path


def load_adapters(path: str | os.PathLike, policy=None, device: str = "auto"):
    """Rebuild a policy from a :func:`save_adapters` folder, or load one into ``policy``.

    Without ``policy``: ``TransformerPolicy(**saved constructor arguments)`` loads the base model
    (from ``model_name_or_path``, as at construction) and injects fresh adapters, then the saved
    adapter and head weights are copied in; its logits equal the saved policy's (tested exactly).
    With ``policy`` (e.g. ``model.policy`` of a new ``PPO`` built with the same ``lora_config``, to
    keep training from the adapters; its optimizer state starts fresh): the weights are copied into it.

    :param path: a folder written by :func:`save_adapters`.
    :param policy: a :class:`agents.TransformerPolicy` with the same ``lora_config``; ``None``: build one.
    :param device: device of a new policy (SB3's ``get_device``: ``"auto"`` picks CUDA when present).
    :return: the policy (``policy`` itself when given).
    :raises FileNotFoundError: ``path`` lacks one of the three parts (not a :func:`save_adapters` folder).
    :raises ValueError: ``policy`` has no adapters or other ``lora_config``, or the saved weights do
        not fit the policy (another base model or ``net_arch``).
    """
    import torch
    from safetensors.torch import load_file
    from stable_baselines3.common.utils import get_device

    path = Path(path)
    missing = [name for name in (POLICY_CONFIG_FILE, HEADS_FILE, "adapter_model.safetensors") if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} has no {missing}: not a folder written by agents.save_adapters")
    data = torch.load(path / POLICY_CONFIG_FILE, weights_only=False)["data"]  # spaces and classes: SB3's policy.load does the same
    if policy is None:
        from agents.policy import TransformerPolicy

        policy = TransformerPolicy(**data).to(get_device(device))
    elif getattr(policy, "peft_model", None) is None or policy.lora_config != data["lora_config"]:
        raise ValueError(f"the policy's lora_config {getattr(policy, 'lora_config', None)} differs from the saved "
                         f"{data['lora_config']}; build the policy with the saved lora_config")
    _load_adapter_weights(policy, path)
    heads = load_file(path / HEADS_FILE, device=str(policy.device))
    result = policy.load_state_dict(heads, strict=False)
    if result.unexpected_keys or any(not name.startswith(_LM_PREFIXES) for name in result.missing_keys):
        raise ValueError(f"{path} does not fit the policy: unexpected {result.unexpected_keys}, missing "
                         f"{[n for n in result.missing_keys if not n.startswith(_LM_PREFIXES)]}; build it with the saved net_arch")
    return policy


def _load_adapter_weights(policy, path: Path) -> None:
    """Copy peft's saved adapter weights into ``policy.peft_model`` (adapter ``default``)."""
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(str(path), device=str(policy.device))
    result = set_peft_model_state_dict(policy.peft_model, weights)
    if result.unexpected_keys:
        raise ValueError(f"{path}'s adapters do not fit the policy's LM (unexpected {result.unexpected_keys[:5]}...); "
                         "load them onto the base model they were trained on")
