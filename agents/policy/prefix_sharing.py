"""Share one transformer forward among observations that are prefixes of one another.

In a token-level text MDP every state of an episode is a prefix of the episode's last state, and
a causal transformer's hidden state at position ``p`` depends only on tokens ``<= p``. So the
hidden states of a whole episode come out of one forward over its longest observation, instead of
one forward per step (the same fact TRL's PPO trainer uses when it scores a whole response in one
pass).

A second saving stacks on the first: the episodes of a minibatch often begin with the same tokens
(a chat template's system turn, a multi-turn game's rules, every member of an RLOO/GRPO group's
prompt). :func:`last_token_features` with ``min_shared_prefix`` runs that common prefix once and
lets every episode attend to its keys and values (a KV cache expanded over the episodes, as
``generate`` continues from a prompt), instead of re-encoding it in every row. With grad the
gradient of the shared prefix is the sum over the episodes that read it, as in the per-row forward.
"""

from __future__ import annotations

import torch as th
from transformers import DynamicCache

from agents.policy.extractor import last_token_index, lm_hidden_states
from agents.policy.kv_cache import cache_argument


class FixedPastCache(DynamicCache):
    """A ``DynamicCache`` holding a fixed past: each layer attends to the past's keys and values plus
    its new ones, but nothing is stored (``update`` returns the concatenation and keeps the past).

    So a forward that reads it can run again with the same result: an activation-checkpointed layer
    may be recomputed in the backward pass (:mod:`agents.policy.checkpointing` checks
    :attr:`stores_updates`).
    """

    stores_updates = False

    def update(self, key_states: th.Tensor, value_states: th.Tensor, layer_idx: int, *args, **kwargs):
        """``(past keys ++ key_states, past values ++ value_states)`` along the sequence (``dim=-2``)."""
        layer = self.layers[layer_idx]
        return th.cat([layer.keys, key_states], dim=-2), th.cat([layer.values, value_states], dim=-2)


MIN_SHARED_PREFIX = 16
"""Common prefix (tokens) from which :func:`last_token_features` runs it once instead of in every episode:
below it the second forward and the cache cost more than they save."""


def covering_rows(input_ids: th.Tensor, attention_mask: th.Tensor, chunk: int = 256) -> th.Tensor:
    """For each row, the longest row of the batch whose real tokens extend it.

    Row ``j`` covers row ``i`` when their real-token blocks start at the same position, ``j``'s
    block contains ``i``'s, and the tokens agree on ``i``'s block: then a causal LM gives both
    rows the same hidden states on ``i``'s block. Every row covers itself.

    :param input_ids: ``(B, L)`` integer token ids.
    :param attention_mask: ``(B, L)`` 0/1, one contiguous block of ones per row.
    :param chunk: rows compared at once (memory is ``chunk * B * L`` booleans).
    :return: ``(B,)`` int64 index of the covering row with the most real tokens (ties: the lowest
        index, so identical rows share one representative and ``rep[rep] == rep``).
    """
    real = attention_mask.bool()
    length = real.sum(-1)
    start = th.argmax(real.to(th.int8), dim=-1)
    reps = th.empty(real.shape[0], dtype=th.long, device=real.device)
    for lo in range(0, real.shape[0], chunk):
        mine = real[lo:lo + chunk, None, :]
        same_tokens = ((input_ids[lo:lo + chunk, None, :] == input_ids[None]) | ~mine).all(-1)
        contains = (mine <= real[None]).all(-1) & (start[lo:lo + chunk, None] == start[None])
        score = th.where(same_tokens & contains, length[None], -1)
        reps[lo:lo + chunk] = score.argmax(-1)
    return reps


def shared_prefix_length(input_ids: th.Tensor, attention_mask: th.Tensor) -> int:
    """How many tokens every row's real-token block begins with (wherever the block starts).

    :param input_ids: ``(B, L)`` integer token ids.
    :param attention_mask: ``(B, L)`` 0/1, one contiguous non-empty block of ones per row.
    :return: the length of the longest common prefix of the rows' real tokens, at most the shortest row's length.
    """
    real = attention_mask.bool()
    start = th.argmax(real.to(th.int8), dim=-1)
    shortest = int(real.sum(-1).min())
    columns = (start[:, None] + th.arange(shortest, device=input_ids.device)[None]).clamp(max=input_ids.shape[-1] - 1)
    tokens = input_ids.gather(1, columns)
    agree = (tokens == tokens[:1]).all(0)
    return shortest if bool(agree.all()) else int(agree.to(th.int8).argmin())


def prefix_then_rest_hidden(lm, input_ids: th.Tensor, attention_mask: th.Tensor, prefix: int) -> th.Tensor:
    """Final hidden states of each row's real tokens, the ``prefix`` tokens all rows share run once.

    The shared prefix is encoded in one row with a KV cache, whose keys and values every row then
    attends to while its own remaining tokens (left-aligned, right-padded) are encoded in one batch
    (a :class:`FixedPastCache`, so activation checkpointing may recompute that batch's layers);
    position ids count real tokens, as in :func:`agents.policy.extractor.lm_hidden_states`.

    :param lm: a transformers causal LM whose trunk ``lm.base_model`` returns a ``DynamicCache`` of
        full-attention layers (what :class:`agents.policy.kv_cache.RolloutKVCache` checks).
    :param input_ids: ``(G, L)`` integer token ids.
    :param attention_mask: ``(G, L)`` 0/1, one contiguous block of ones per row.
    :param prefix: ``1 <= prefix <=`` :func:`shared_prefix_length` of the rows.
    :return: ``(G, W, hidden_size)`` in the LM's dtype, ``W`` the longest row: ``[g, k]`` is row ``g``'s
        ``k``-th real token (counted from its first), undefined beyond the row's length.
    """
    ids, mask = input_ids.long(), attention_mask.long()
    rows, device = ids.shape[0], ids.device
    start = th.argmax(mask.to(th.int8), dim=-1)
    length = mask.sum(-1)
    argument = cache_argument(lm.base_model)
    first = int(start[0])
    out = lm.base_model(input_ids=ids[:1, first:first + prefix], position_ids=th.arange(prefix, device=device)[None],
                        use_cache=True, **{argument: DynamicCache()})
    prefix_hidden = out.last_hidden_state.expand(rows, -1, -1)
    width = int((length - prefix).max())
    if width == 0:
        return prefix_hidden
    # Every row reads the prefix's keys and values through an expand, so autograd sums the rows'
    # gradients into the one prefix forward, as the per-row forwards would have summed theirs.
    past = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1))
            for layer in out[argument].layers]
    offsets = th.arange(width, device=device)[None]
    valid = offsets < (length - prefix)[:, None]
    columns = (start[:, None] + prefix + offsets).clamp(max=ids.shape[-1] - 1)
    rest_ids = th.where(valid, ids.gather(1, columns), 0)
    rest_mask = th.cat([mask.new_ones(rows, prefix), valid.long()], dim=-1)
    rest = lm.base_model(input_ids=rest_ids, attention_mask=rest_mask, position_ids=(prefix + offsets).expand(rows, -1),
                         use_cache=True, **{argument: FixedPastCache(ddp_cache_data=past)})
    return th.cat([prefix_hidden, rest.last_hidden_state], dim=1)


def last_token_features(lm, input_ids: th.Tensor, attention_mask: th.Tensor,
                        min_shared_prefix: int | None = None) -> th.Tensor:
    """Each row's final hidden state at its last real token, one forward per covering row.

    :param lm: a transformers causal LM (see :func:`agents.policy.extractor.lm_hidden_states`).
    :param input_ids: ``(B, L)`` integer token ids.
    :param attention_mask: ``(B, L)`` 0/1, one contiguous block of ones per row.
    :param min_shared_prefix: when the covering rows (two or more) share a prefix of at least this
        many tokens, run it once (:func:`prefix_then_rest_hidden`); ``None``: never (for LMs whose
        cache :class:`agents.policy.kv_cache.RolloutKVCache` cannot use).
    :return: ``float32 (B, hidden_size)`` (whatever the LM's dtype), equal (up to float rounding) to
        running every row alone.
    """
    ids, mask = input_ids.long(), attention_mask.long()
    groups, group_of_row = th.unique(covering_rows(ids, mask), return_inverse=True)
    if min_shared_prefix is not None and len(groups) > 1:
        prefix = shared_prefix_length(ids[groups], mask[groups])
        if prefix >= max(1, min_shared_prefix):
            hidden = prefix_then_rest_hidden(lm, ids[groups], mask[groups], prefix)
            start = th.argmax(mask.to(th.int8), dim=-1)  # a row's block starts where its covering row's does
            return hidden[group_of_row, last_token_index(mask) - start].float()
    hidden, offset = lm_hidden_states(lm, ids[groups], mask[groups])
    return hidden[group_of_row, last_token_index(mask) - offset].float()
