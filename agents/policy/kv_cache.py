"""KV-cached incremental decoding for rollouts, behind SB3's one-call-per-env-step interface.

SB3's ``PPO.collect_rollouts`` calls the policy once per env step with the full observation of
every env. In a token-level text MDP the observation of step ``t + 1`` is that of step ``t`` plus
the sampled token, so a causal LM need not re-encode it: keeping the attention keys and values
of the previous steps (the KV cache of ``model.generate``) and feeding only the new token gives the
same hidden state. In a multi-turn episode (:class:`textgym.dialogue.DialogueEnv`) the
environment's answer is appended after the agent's last token, so a row then grows by ``k > 1``
tokens at once, and the cache feeds exactly those ``k``. :class:`RolloutKVCache` does this per
env row and checks every row, every step, instead of trusting that the rows continue: a row whose
observation does *not* extend its previous observation (a new episode after an auto-reset, a
changed batch) is re-encoded alone, and the other rows still take incremental steps, one forward
per distinct number of appended tokens.

Layout of the cache: per layer, keys and values ``(B, kv_heads, S, head_dim)``, plus a 0/1 mask
``(B, S)``. Each row's cached tokens are right-aligned (left padding, as in batched ``generate``),
so a step appends ``k`` columns for the rows it extends (the other rows get ``k`` columns of
left padding when the pieces are merged), and a re-encoded row is written into the rightmost
columns of its row. Leading columns that are padding in every row are dropped, so ``S``
never exceeds the longest row, at most the observation window ``L``: memory is bounded however long
training runs. Position ids count real tokens only, the convention of
:func:`agents.policy.extractor.lm_hidden_states`, so cached and uncached features agree to float rounding.
"""

from __future__ import annotations

import torch as th

from agents.policy.extractor import last_token_index


def weights_version(parameters: list[th.Tensor]) -> int:
    """A number that changes whenever any of ``parameters`` is modified in place.

    Sum of the parameters' autograd version counters (``Tensor._version``), which every in-place
    operation bumps: optimizer steps, ``load_state_dict``, ``copy_``. (Writes through ``.data``
    bypass the counter; nothing in SB3, torch optimizers or peft updates weights that way.)
    """
    return sum(p._version for p in parameters)


def adapter_layers(lm: th.nn.Module) -> list[th.nn.Module]:
    """The peft adapter layers inside ``lm`` (``peft.tuners.tuners_utils.BaseTunerLayer``); ``[]`` without peft."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return []
    return [m for m in lm.modules() if isinstance(m, BaseTunerLayer)]


def adapters_state(layers: list[th.nn.Module]) -> tuple:
    """Which adapters each peft layer applies: ``(disabled, active adapter names)`` per layer.

    Toggling adapters (peft's ``disable_adapter()``, ``set_adapter``) changes what the model
    computes without modifying any weight, so :func:`weights_version` alone would not see it.
    """
    return tuple((layer.disable_adapters, tuple(layer.active_adapters)) for layer in layers)


def appended_tokens(prev_ids: th.Tensor, prev_mask: th.Tensor, ids: th.Tensor, mask: th.Tensor) -> th.Tensor:
    """How many tokens each row appended to its previous observation; 0 where it does not extend it.

    A row extends its previous observation when its real-token block starts at the same slot,
    contains the previous block, and agrees with it on the previous block's tokens; it then
    appended ``len(block) - len(previous block) >= 1`` tokens (1 per agent step of a single-turn
    episode; 1 + the environment's answer when a turn of a dialogue ends).

    :param prev_ids: ``(B, L)`` integer token ids of the previous observations.
    :param prev_mask: ``(B, L)`` 0/1 masks of the previous observations (one contiguous block each).
    :param ids: ``(B, L)`` integer token ids of the new observations.
    :param mask: ``(B, L)`` 0/1 masks of the new observations.
    :return: ``(B,)`` int64, 0 for rows that must be re-encoded.
    """
    prev_real, real = prev_mask.bool(), mask.bool()
    kept = ((ids == prev_ids) | ~prev_real).all(-1) & (real | ~prev_real).all(-1)
    same_start = real.to(th.int8).argmax(-1) == prev_real.to(th.int8).argmax(-1)
    grown = real.sum(-1) - prev_real.sum(-1)
    return th.where(kept & same_start & (grown > 0), grown, 0)


def right_align(ids: th.Tensor, mask: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
    """Move each row's block of real tokens to the right end of a window as wide as the longest block.

    :param ids: ``(B, L)`` integer token ids.
    :param mask: ``(B, L)`` 0/1, one contiguous block of ones per row, at least one per row.
    :return: ``(ids, mask)``, int64 ``(B, W)`` with ``W`` the longest block; padding ids are 0.
    """
    length = mask.sum(-1)
    width = int(length.max())
    start = mask.to(th.int8).argmax(-1)
    columns = th.arange(width, device=ids.device)
    pad = (width - length)[:, None]
    source = (start[:, None] + columns[None] - pad).clamp(0, ids.shape[-1] - 1)
    valid = columns[None] >= pad
    return th.where(valid, ids.gather(1, source), 0), valid.long()


def _scatter_rows(pieces: list[tuple[th.Tensor, th.Tensor]], batch: int, width: int, dim: int) -> th.Tensor:
    """Left-pad each ``(rows, tensor)`` piece with zeros to ``width`` along ``dim`` and place its rows."""
    shape = list(pieces[0][1].shape)
    shape[0], shape[dim] = batch, width
    out = pieces[0][1].new_zeros(shape)
    for rows, tensor in pieces:
        index = [slice(None)] * len(shape)
        index[dim] = slice(width - tensor.shape[dim], width)
        out[(rows, *index[1:])] = tensor
    return out


def cache_argument(model: th.nn.Module) -> str:
    """Name of the KV-cache argument (and output field) of ``model.forward``: ``"cache"`` in
    transformers releases that renamed it (5.2x: passing ``past_key_values`` warns that it goes
    away in 5.40), ``"past_key_values"`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class RolloutKVCache:
    """Per-env KV cache of a causal LM's trunk, for no-grad rollout steps.

    ``features(input_ids, attention_mask)`` returns what
    :meth:`agents.policy.extractor.CausalLMExtractor.forward` returns — the final hidden state at each
    row's last real token, ``float32 (B, hidden_size)`` — but costs one token per continuing row
    (or the ``k`` tokens a dialogue turn appended) instead of the whole window. Exact up to float
    rounding: rows are verified against the previous call (:func:`appended_tokens`), and the whole cache is dropped when the batch size
    changes, any LM weight changed since the cache was built (:func:`weights_version`), or LoRA
    adapters were switched on or off (:func:`adapters_state`).

    Works with transformers models whose ``base_model`` takes a ``DynamicCache`` of
    full-attention layers (GPT-2, Llama, Mistral, Qwen2, ...; the same mechanism as ``generate``),
    under the argument name the installed transformers uses (:func:`cache_argument`).

    :param lm: a transformers causal LM in eval mode; its trunk is ``lm.base_model``.
    """

    def __init__(self, lm: th.nn.Module):
        self.lm = lm
        self._cache_argument = cache_argument(lm.base_model)
        self.clear()

    def clear(self) -> None:
        """Forget everything; the next call re-encodes every row."""
        self.layers: list[tuple[th.Tensor, th.Tensor]] | None = None
        self.mask: th.Tensor | None = None
        self._prev: tuple[th.Tensor, th.Tensor] | None = None
        self._version: tuple | None = None
        # Listed anew at every clear (each rollout start), so adapters added later are watched too.
        self._parameters = list(self.lm.parameters())
        self._adapter_layers = adapter_layers(self.lm)

    def check(self) -> None:
        """Run two cached steps on a 1-token and a 2-token row, then forget them.

        Called when a policy is built, so that a model whose cache this class cannot use fails
        then rather than at the first rollout step.

        :raises RuntimeError: as :meth:`features`.
        """
        device = next(self.lm.parameters()).device
        ids = th.zeros(1, 2, dtype=th.long, device=device)
        self.features(ids, th.tensor([[1, 0]], device=device))
        self.features(ids, th.ones(1, 2, dtype=th.long, device=device))
        self.clear()

    def keep_rows(self, rows: th.Tensor) -> None:
        """Keep only ``rows`` of the cache, in that order: the next call's batch is those rows.

        For a caller that stops stepping some envs (held-out sampling drops the envs whose
        episode ended until a new wave starts, as batched ``generate`` drops nothing but pads):
        the kept rows continue incrementally instead of the batch-size change clearing the cache.

        :param rows: ``(K,)`` int64 indices into the last call's batch; ``K = 0`` empties the cache.
        """
        if self._prev is None:
            return
        rows = rows.to(device=self._prev[0].device, dtype=th.long)
        self._prev = (self._prev[0][rows], self._prev[1][rows])
        self.mask = self.mask[rows]
        self.layers = [(key[rows], value[rows]) for key, value in self.layers]
        if len(rows):
            self._drop_padding_columns()

    @property
    def width(self) -> int:
        """Cached columns ``S`` (0 when empty); never more than the longest row's real tokens."""
        return 0 if self.mask is None else self.mask.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached keys, values and mask."""
        if self.layers is None:
            return 0
        return self.mask.nbytes + sum(k.nbytes + v.nbytes for k, v in self.layers)

    @th.no_grad()
    def features(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
        """Hidden state at each row's last real token, reusing the cache where a row continues.

        :param input_ids: ``(B, L)`` integer token ids (:class:`textgym.spaces.TokenWindowSpace`).
        :param attention_mask: ``(B, L)`` 0/1, one contiguous non-empty block of ones per row.
        :return: ``float32 (B, hidden_size)``.
        :raises RuntimeError: the model's cache is not a list of full-attention key/value layers
            (use ``policy_kwargs=dict(kv_cache=False)``).
        """
        ids, mask = input_ids.long(), attention_mask.long()
        version = weights_version(self._parameters), adapters_state(self._adapter_layers)
        if self._prev is None or self._prev[0].shape != ids.shape or version != self._version:
            self.clear()
            appended = th.zeros(ids.shape[0], dtype=th.long, device=ids.device)
        else:
            appended = appended_tokens(*self._prev, ids, mask)

        parts, hidden = [], []
        for k in th.unique(appended[appended > 0]).tolist():
            rows = (appended == k).nonzero().squeeze(-1)
            last, *part = self._step(rows, ids, mask, k)
            parts.append((rows, *part))
            hidden.append(last)
        encode_rows = (appended == 0).nonzero().squeeze(-1)
        if len(encode_rows):
            last, *part = self._encode(encode_rows, ids, mask)
            parts.append((encode_rows, *part))
            hidden.append(last)
        self._store(parts, ids.shape[0])
        order = th.cat([rows for rows, _, _ in parts]).argsort()
        hidden = th.cat(hidden)[order]
        self._prev, self._version = (ids, mask), version
        return hidden

    def _step(self, rows: th.Tensor, ids: th.Tensor, mask: th.Tensor, k: int):
        """The ``k`` tokens appended to each of ``rows``: attend to their cached keys and values."""
        whole = len(rows) == ids.shape[0]
        past = self.layers if whole else [(key[rows], value[rows]) for key, value in self.layers]
        past_mask = self.mask if whole else self.mask[rows]
        last = last_token_index(mask[rows])[:, None]
        new_tokens = ids[rows].gather(1, last - k + 1 + th.arange(k, device=ids.device)[None])
        step_mask = th.cat([past_mask, past_mask.new_ones(len(rows), k)], dim=-1)
        # Position ids count real tokens before each new one.
        positions = past_mask.sum(-1, keepdim=True) + th.arange(k, device=ids.device)[None]
        return self._run(new_tokens, step_mask, positions, past)

    def _encode(self, rows: th.Tensor, ids: th.Tensor, mask: th.Tensor):
        """Whole observations for rows without a usable cache (new episode, first call); identical
        rows (an RLOO/GRPO group's members starting together) are encoded once and their cache copied."""
        row_ids, row_mask = right_align(ids[rows], mask[rows])
        distinct, copy_of = th.unique(th.cat([row_ids, row_mask], dim=-1), dim=0, return_inverse=True)
        if len(distinct) == len(rows):
            positions = (row_mask.cumsum(-1) - 1).clamp(min=0)
            return self._run(row_ids, row_mask, positions, None)
        width = row_ids.shape[-1]
        distinct_ids, distinct_mask = distinct[:, :width], distinct[:, width:]
        positions = (distinct_mask.cumsum(-1) - 1).clamp(min=0)
        last, layers, encoded_mask = self._run(distinct_ids, distinct_mask, positions, None)
        return last[copy_of], [(key[copy_of], value[copy_of]) for key, value in layers], encoded_mask[copy_of]

    def _run(self, ids, mask, positions, past):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=past) if past is not None else DynamicCache()
        out = self.lm.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 use_cache=True, **{self._cache_argument: cache})
        layers = getattr(out[self._cache_argument], "layers", None)
        if not layers or any(getattr(layer, "keys", None) is None or layer.is_sliding for layer in layers):
            raise RuntimeError(f"{type(self.lm).__name__} does not return a DynamicCache of full-attention "
                               "layers; turn KV-cached rollouts off with policy_kwargs=dict(kv_cache=False)")
        return out.last_hidden_state[:, -1].float(), [(layer.keys, layer.values) for layer in layers], mask

    def _store(self, parts, batch: int) -> None:
        """Merge the rows' new caches into one right-aligned cache and drop all-padding columns."""
        if len(parts) == 1:  # every row took the same path, so ``parts[0]`` holds rows 0..B-1 in order
            _, self.layers, self.mask = parts[0]
        else:
            width = max(row_mask.shape[-1] for _, _, row_mask in parts)
            self.mask = _scatter_rows([(rows, row_mask) for rows, _, row_mask in parts], batch, width, -1)
            self.layers = [
                tuple(_scatter_rows([(rows, layers[i][j]) for rows, layers, _ in parts], batch, width, -2)
                      for j in (0, 1))
                for i in range(len(parts[0][1]))
            ]
        self._drop_padding_columns()

    def _drop_padding_columns(self) -> None:
        """Drop the leading columns that are padding in every row (rows are right-aligned)."""
        keep = int(self.mask.sum(-1).max())
        if keep < self.mask.shape[-1]:
            self.mask = self.mask[:, -keep:]
            self.layers = [(k[..., -keep:, :], v[..., -keep:, :]) for k, v in self.layers]
