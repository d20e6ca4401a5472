"""Adapters-only checkpoints of a LoRA :class:`agents.TransformerPolicy`: the policy without its
frozen base weights.

SB3's ``model.save`` and ``policy.save`` write the whole ``state_dict``, frozen base LM included;
:func:`save_adapters` writes what differs from the base model (peft's adapter files, the value head
and the policy's constructor arguments) and :func:`load_adapters` rebuilds the policy from the base
model with the same logits. The adapters themselves are :mod:`agents.policy.lora`'s.
"""

from __future__ import annotations

import os
from pathlib import Path

from agents.policy import TransformerPolicy
from agents.training.atomic import atomic_directory

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
    :param path: folder to write, atomically: filled under a temporary name, then renamed into place
        (an existing folder of that name is replaced whole).
    :return: the folder.
    :raises ValueError: the policy has no LoRA adapters.
    :raises OSError: the folder could not be written (disk full, permission); ``path`` is unchanged.
    """
    import torch
    from safetensors.torch import save_file

    peft_model = getattr(policy, "peft_model", None)
    if peft_model is None:
        raise ValueError("the policy has no LoRA adapters, so there is nothing smaller to save; "
                         "use policy.save(path) (TransformerPolicy.load reads it)")
    heads = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()
             if not name.startswith(_LM_PREFIXES)}
    with atomic_directory(path) as folder:  # a kill mid-save leaves no half folder under the final name
        peft_model.save_pretrained(folder, save_embedding_layers=False)  # the base LM's layers are never resized here
        save_file(heads, folder / HEADS_FILE)
        torch.save({"data": policy._get_constructor_parameters()}, folder / POLICY_CONFIG_FILE)
    return Path(path)


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
