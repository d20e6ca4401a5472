"""Export a trained :class:`agents.TransformerPolicy` as a Hugging Face model directory.

:func:`export_pretrained` writes what ``transformers`` loads without textgym or SB3:

- the LM (``save_pretrained``; LoRA adapters merged into the weights with
  :func:`agents.policy.lora.merged_lm`, never peft's renamed layers), so
  ``AutoModelForCausalLM.from_pretrained(directory)`` gives exactly the policy's next-token
  logits and ``pipeline("text-generation", model=directory)`` works;
- the tokenizer of the policy's model and a ``generation_config.json`` with its eos/pad ids;
- the value head as ``value_head.safetensors`` (PPO's critic; not part of the transformers model);
- a model card, ``README.md``: base model, algorithm and hyperparameters, timesteps, reward
  model, LoRA settings and, when given, held-out evaluation figures.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch as th

from agents.training.atomic import atomic_directory

VALUE_HEAD_FILE = "value_head.safetensors"
"""File name of the exported value head, inside the export directory."""

MLP_PREFIX = "mlp_extractor.value_net."
"""Prefix of the value MLP's tensors (``net_arch=dict(vf=[...])``) in :data:`VALUE_HEAD_FILE`."""

_HYPERPARAMETERS = ("learning_rate", "n_steps", "batch_size", "n_epochs", "gamma", "gae_lambda", "clip_range",
                    "clip_range_vf", "ent_coef", "vf_coef", "max_grad_norm", "target_kl")
_LORA_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "use_rslora", "fan_in_fan_out")
_TOKENIZER_KEYS = ("revision", "trust_remote_code", "token", "subfolder")


def export_pretrained(model: Any, directory: str | os.PathLike, *, evaluation: Any = None,
                      reward_model: Any = None, training_settings: Mapping[str, Any] | None = None) -> Path:
    """Write a trained text policy as a Hugging Face model directory with a model card.

    Files written to ``directory`` (created if missing; files of the same names are overwritten,
    others kept). Everything is first written to a temporary folder beside it, then a new
    ``directory`` is renamed into place at once, or each file is renamed into an existing one, so a
    kill or a full disk never leaves a truncated file under a final name:

    - ``config.json``, ``model.safetensors``: the policy's LM via ``save_pretrained``. With LoRA the
      adapters are merged into a copy of the weights (:func:`agents.policy.lora.merged_lm`), so the files
      hold the base architecture and the policy keeps its adapters;
    - the tokenizer files of the policy's model (``policy.model_name_or_path``, resolved like the
      env's tokenizer by :func:`textgym.assets.resolve_pretrained`);
    - ``generation_config.json``: the LM's own generation config (or one built from its config)
      with ``eos_token_id`` and ``pad_token_id`` set (pad falls back to eos). Sampling settings are
      left as the model had them; the policy itself sampled at temperature 1 without top-k/top-p;
    - ``value_head.safetensors``: the critic, ``V = weight @ mlp(h) + bias`` where ``h`` is the
      LM trunk's final hidden state at the last real token (``model.base_model(ids).last_hidden_state[:, -1]``).
      Tensors ``weight`` ``(1, d)`` and ``bias`` ``(1,)`` of ``policy.value_net``; with
      ``net_arch=dict(vf=[...])`` also the ``state_dict`` of ``policy.mlp_extractor.value_net``
      under the prefix ``mlp_extractor.value_net.`` (metadata ``vf_layers``, ``activation_fn``);
    - ``README.md``: a model card with YAML front matter (``library_name: transformers``,
      ``base_model`` when the base is a hub id, tags ``textgym``, ``reinforcement-learning`` and the
      algorithm's name), listing the base model, the algorithm and its hyperparameters
      (``learning_rate``, ``n_steps``, ``batch_size``, ``n_epochs``, ``gamma``, ``gae_lambda``,
      ``clip_range``, ``ent_coef``, ... as far as the algorithm has them, then ``training_settings``),
      ``num_timesteps``, the reward model, the LoRA configuration and the evaluation table.

    :param model: an SB3 model (``PPO``, ``A2C``, ...) whose policy is an :class:`agents.TransformerPolicy`,
        or the policy itself (the card then names no algorithm).
    :param directory: where to write; created with its parents.
    :param evaluation: held-out figures for the card: an :class:`agents.TextEvaluation` or a dict of
        them (e.g. :func:`agents.evaluate_against_reference`'s result), shown with
        :func:`agents.training.evaluation.markdown_table`.
    :param reward_model: what the policy was trained to maximise, for the card: a string, or any
        object (its ``repr`` is used).
    :param training_settings: further settings for the card's hyperparameter table (e.g.
        ``{"kl_coef": 0.05, "total_timesteps": 2000}``), appended after the algorithm's own (an
        entry of the same name replaces the algorithm's value).
    :return: ``directory`` as a ``pathlib.Path``.
    :raises TypeError: ``model`` is neither a TransformerPolicy nor a model whose ``policy`` is one;
        ``evaluation`` is not a ``TextEvaluation`` or a dict of them; ``training_settings`` is not a mapping.
    :raises textgym.assets.AssetError: the textgym default model's tokenizer could not be fetched.
    :raises OSError: the tokenizer could not be loaded, or ``directory`` could not be written (the
        message names it; nothing in it was replaced).
    """
    from safetensors.torch import save_file

    from agents.policy.lora import merged_lm

    policy = _transformer_policy(model)
    evaluations = _evaluations(evaluation)
    if training_settings is not None and not isinstance(training_settings, Mapping):
        raise TypeError(f"training_settings must be a dict of setting -> value, got {type(training_settings).__name__}")
    tokenizer = _tokenizer(policy)  # before writing anything: a missing tokenizer leaves no half export

    lm = policy.lm if policy.peft_model is None else merged_lm(policy)
    tensors, metadata = _value_head(policy)
    card = _model_card(model, policy, lm, evaluations, reward_model, dict(training_settings or {}))
    with atomic_directory(directory, merge=True) as folder:  # a kill or full disk leaves no half-written weights
        lm.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _generation_config(lm, tokenizer).save_pretrained(folder)
        save_file(tensors, str(folder / VALUE_HEAD_FILE), metadata=metadata)
        (folder / "README.md").write_text(card, encoding="utf-8")
    return Path(directory)


def _transformer_policy(model: Any):
    from agents.policy import TransformerPolicy

    if isinstance(model, TransformerPolicy):
        return model
    policy = getattr(model, "policy", None)
    if isinstance(policy, TransformerPolicy):
        return policy
    what = type(model).__name__ + (f" (policy: {type(policy).__name__})" if policy is not None else "")
    raise TypeError(f"export_pretrained needs an SB3 model (PPO, A2C, ...) whose policy is an "
                    f"agents.TransformerPolicy, or such a policy; got {what}")


def _evaluations(evaluation: Any) -> dict[str, Any] | None:
    from agents.training.evaluation import TextEvaluation

    if evaluation is None:
        return None
    if isinstance(evaluation, TextEvaluation):
        return {evaluation.name: evaluation}
    if isinstance(evaluation, Mapping) and evaluation and all(isinstance(e, TextEvaluation) for e in evaluation.values()):
        return dict(evaluation)
    raise TypeError("evaluation must be an agents.TextEvaluation or a non-empty dict of them "
                    f"(evaluate_against_reference's result), got {type(evaluation).__name__}")


def _tokenizer(policy):
    from transformers import AutoTokenizer

    from textgym.assets import resolve_pretrained

    kwargs = {k: v for k, v in policy.from_pretrained_kwargs.items() if k in _TOKENIZER_KEYS}
    return AutoTokenizer.from_pretrained(resolve_pretrained(policy.model_name_or_path), **kwargs)


def _generation_config(lm, tokenizer):
    import copy

    from transformers import GenerationConfig

    config = getattr(lm, "generation_config", None)
    config = copy.deepcopy(config) if config is not None else GenerationConfig.from_model_config(lm.config)
    eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if eos is None:
        eos = getattr(lm.config.get_text_config(), "eos_token_id", None)
    pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    config.eos_token_id, config.pad_token_id = eos, pad
    return config


def _value_head(policy) -> tuple[dict[str, th.Tensor], dict[str, str]]:
    def plain(tensor: th.Tensor) -> th.Tensor:
        return tensor.detach().to("cpu", th.float32).contiguous()

    tensors = {"weight": plain(policy.value_net.weight), "bias": plain(policy.value_net.bias)}
    mlp = policy.mlp_extractor.value_net
    tensors.update({MLP_PREFIX + name: plain(t) for name, t in mlp.state_dict().items()})
    vf_layers = [m.out_features for m in mlp if isinstance(m, th.nn.Linear)]
    activations = sorted({type(m).__name__ for m in mlp if not isinstance(m, th.nn.Linear)})
    metadata = {
        "format": "pt",
        "input": "final hidden state of the LM trunk at the last real token (base_model(...).last_hidden_state)",
        "hidden_size": str(policy.value_net.in_features if not vf_layers else mlp[0].in_features),
        "vf_layers": json.dumps(vf_layers),
        "activation_fn": activations[0] if activations else "",
    }
    return tensors, metadata


def _format(value: Any) -> str:
    if callable(value):  # an SB3 schedule of the remaining progress (1 at the start, 0 at the end)
        try:
            start, end = float(value(1.0)), float(value(0.0))
        except Exception:  # noqa: BLE001  (not a schedule of one float: show it as it is)
            return f"`{value!r}`"
        return f"{start:g}" if start == end else f"{start:g} → {end:g} (schedule)"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, (list, tuple, dict)) else str(value)


def _hub_id(name: str) -> str | None:
    """The hub id to put in the card's ``base_model``: none for a local directory."""
    from textgym.assets import DEFAULT_MODEL

    if name == DEFAULT_MODEL:
        return "HuggingFaceTB/SmolLM2-135M-Instruct"
    if os.path.exists(name) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        return None
    return name


def _model_card(model, policy, lm, evaluations, reward_model, training_settings: dict[str, Any]) -> str:
    from textgym.assets import DEFAULT_MODEL

    base = policy.model_name_or_path
    algorithm = None if model is policy else type(model).__name__
    hub_id = _hub_id(base)
    tags = ["textgym", "reinforcement-learning", *([algorithm.lower()] if algorithm else []),
            *(["lora"] if policy.lora_config else [])]
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation"]
    if hub_id:
        front.append(f"base_model: {hub_id}")
    front += ["tags:", *(f"- {tag}" for tag in tags), "---"]

    base_text = f"`{base}`"
    if base == DEFAULT_MODEL:
        base_text += " (textgym's default: SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to fp32)"
    lines = [*front, "", f"# {type(lm).__name__} fine-tuned with {algorithm or 'reinforcement learning'} (textgym)", "",
             f"A causal language model fine-tuned with reinforcement learning in "
             f"textgym (Stable-Baselines3 {algorithm or 'actor-critic'} with "
             f"`agents.TransformerPolicy`: the LM's own head is the policy, one token per action).", "",
             f"- **Base model:** {base_text}",
             f"- **Algorithm:** {algorithm or 'not recorded (exported from the policy alone)'}"]
    if algorithm:
        lines.append(f"- **Timesteps (tokens sampled in training):** {getattr(model, 'num_timesteps', 0):,}")
    reward = "not recorded" if reward_model is None else (reward_model if isinstance(reward_model, str) else repr(reward_model))
    lines.append(f"- **Reward model:** {reward}")
    if policy.lora_config:
        lines.append("- **LoRA:** trained as LoRA adapters, merged into the weights of this export")

    hyper = {}
    if algorithm:
        hyper["n_envs"] = getattr(model, "n_envs", None)
        hyper.update({name: getattr(model, name) for name in _HYPERPARAMETERS if getattr(model, name, None) is not None})
    if policy.value_learning_rate is not None:
        hyper["value_learning_rate"] = policy.value_learning_rate
    hyper.update(training_settings)
    hyper = {k: v for k, v in hyper.items() if v is not None or k in training_settings}
    if hyper:
        lines += ["", "## Training hyperparameters", "", "| setting | value |", "|---|---|",
                  *(f"| {name} | {_format(value)} |" for name, value in hyper.items())]
    if policy.lora_config:
        lora = {k: policy.lora_config[k] for k in _LORA_KEYS if k in policy.lora_config}
        lines += ["", "## LoRA configuration", "", "| setting | value |", "|---|---|",
                  *(f"| {name} | {_format(value)} |" for name, value in lora.items()),
                  "", "The adapters are merged into the weights (`W + (lora_alpha / r) B A`): this is a plain "
                  "transformers model, no `peft` needed."]
    if evaluations:
        from agents.training.evaluation import markdown_table

        lines += ["", "## Held-out evaluation", "", markdown_table(evaluations), "",
                  "Mean reward ± standard error, KL to the reference model in nats per episode, perplexity of the "
                  "completions under the reference, distinct-1/2 over whitespace words, mean completion length in tokens."]
    lines += ["", "## Usage", "", "```python", "from transformers import pipeline", "",
              'generator = pipeline("text-generation", model="path/to/this/directory")',
              'print(generator("The movie was", max_new_tokens=20, do_sample=True, top_k=0, top_p=1.0)[0]["generated_text"])',
              "```", "",
              "The policy was trained sampling from the full distribution at temperature 1 "
              "(`do_sample=True, top_k=0, top_p=1.0`).", "",
              "## Value head", "",
              f"`{VALUE_HEAD_FILE}` holds the critic trained with the policy (not part of the transformers model): "
              "`V(text) = weight @ h + bias`, where `h` is the trunk's final hidden state at the last token, "
              "`model.base_model(input_ids).last_hidden_state[:, -1]`"
              + (f", first passed through the MLP stored under `{MLP_PREFIX}`" if len(policy.mlp_extractor.value_net) else "")
              + ".", "",
              "```python", "import torch", "from safetensors.torch import load_file", "",
              f'state = load_file("{VALUE_HEAD_FILE}")',
              'value_head = torch.nn.Linear(state["weight"].shape[1], 1)',
              'value_head.load_state_dict({"weight": state["weight"], "bias": state["bias"]})',
              "```", ""]
    return "\n".join(lines)
