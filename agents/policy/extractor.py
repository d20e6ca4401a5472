"""The transformer trunk as an SB3 features extractor."""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor


def load_causal_lm(model_name_or_path: str, **from_pretrained_kwargs: Any):
    """Load a pretrained ``AutoModelForCausalLM`` in fp32, eval mode (dropout off).

    :param model_name_or_path: hub id, local directory, or :data:`textgym.assets.DEFAULT_MODEL`.
    :param from_pretrained_kwargs: passed to ``from_pretrained`` (e.g. ``revision``,
        ``attn_implementation``); ``dtype`` defaults to ``torch.float32``.
    :raises textgym.assets.AssetError: the default model could not be fetched.
    :raises FileNotFoundError: a local path that does not exist (:func:`textgym.assets.check_model_path`).
    :raises OSError: transformers could not find the model.
    :raises ValueError: the model is an encoder-decoder (T5, BART, ...), not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from textgym.assets import check_model_path, resolve_pretrained

    check_model_path(model_name_or_path)
    path = resolve_pretrained(model_name_or_path)
    config_keys = ("revision", "trust_remote_code", "token", "gguf_file", "subfolder")
    try:
        config = AutoConfig.from_pretrained(path, **{k: v for k, v in from_pretrained_kwargs.items() if k in config_keys})
    except (OSError, ValueError):  # no standalone config: from_pretrained below reports what is missing
        config = None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{model_name_or_path} is an encoder-decoder model: textgym's policy is a decoder-only "
                         "causal LM that reads the prompt and its own tokens in one sequence; use a causal LM "
                         "(GPT-2, Llama, Qwen2, SmolLM2, ...)")
    from_pretrained_kwargs.setdefault("dtype", th.float32)
    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    return model.eval()


def last_token_index(attention_mask: th.Tensor) -> th.Tensor:
    """Index of the last real token in each row.

    :param attention_mask: ``(B, L)`` integer or bool tensor, 1 on real tokens.
    :return: ``(B,)`` int64 tensor; for a row without real tokens, -1.
    """
    length = attention_mask.shape[-1]
    positions = th.arange(length, device=attention_mask.device)
    return th.where(attention_mask.bool(), positions, -1).max(dim=-1).values


def lm_hidden_states(lm, input_ids: th.Tensor, attention_mask: th.Tensor) -> tuple[th.Tensor, int]:
    """Final hidden states of a causal LM's trunk over the columns that hold a real token in some row.

    Position ids count real tokens only, so left padding does not shift positions (as ``generate``
    does for GPT-2 and Llama).

    :param lm: a transformers causal LM (``PreTrainedModel``); its trunk is ``lm.base_model``.
    :param input_ids: ``(B, L)`` integer token ids (any integer dtype, or floats holding integers).
    :param attention_mask: ``(B, L)`` 0/1, one contiguous block of ones per row.
    :return: ``(hidden, offset)``: ``float32 (B, hi - offset, hidden_size)`` for columns
        ``offset .. hi - 1``, where ``offset`` is the first column with a real token in any row and
        ``hi - 1`` the last. Padding-only columns (the unused part of the prompt window, the
        generation slots not reached yet) are not computed; column ``c`` is ``hidden[:, c - offset]``.
    """
    mask = attention_mask.long()
    real = mask.bool().any(0)
    offset = int(real.to(th.int8).argmax())
    hi = int(last_token_index(mask).max()) + 1
    ids, mask = input_ids[:, offset:hi].long(), mask[:, offset:hi]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state, offset


class CausalLMExtractor(BaseFeaturesExtractor):
    """Hidden states of a pretrained causal LM's trunk (the LM without its output head).

    ``forward(obs)`` returns the final hidden state at each observation's last real token, the
    state from which the next token is predicted: ``float32 (B, hidden_size)``. The full model is
    kept in ``self.lm`` (so its output head can serve as the policy's action net and
    ``save_pretrained`` still works); the trunk is ``self.lm.base_model``.

    Observations follow :class:`textgym.spaces.TokenWindowSpace`: ``input_ids`` ``(B, L)`` and
    ``attention_mask`` ``(B, L)`` with one contiguous block of real tokens per row.

    :param observation_space: the env's observation space.
    :param model_name_or_path: model to load.
    :param from_pretrained_kwargs: extra ``from_pretrained`` arguments.
    """

    def __init__(self, observation_space: spaces.Dict, model_name_or_path: str,
                 from_pretrained_kwargs: dict[str, Any] | None = None):
        super().__init__(observation_space, features_dim=1)
        self.lm = load_causal_lm(model_name_or_path, **(from_pretrained_kwargs or {}))
        self._features_dim = self.lm.config.get_text_config().hidden_size

    def forward(self, observations: dict[str, th.Tensor]) -> th.Tensor:
        """Hidden state at each observation's last real token: ``float32 (B, hidden_size)``."""
        mask = observations["attention_mask"]
        hidden, offset = lm_hidden_states(self.lm, observations["input_ids"], mask)
        rows = th.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(mask) - offset].float()
