"""Share one transformer forward among observations that are prefixes of one another.

In a token-level text MDP every state of an episode is a prefix of the episode's last state, and
a causal transformer's hidden state at position ``p`` depends only on tokens ``<= p``. So the
hidden states of a whole episode come out of one forward over its longest observation, instead of
one forward per step (the same fact TRL's PPO trainer uses when it scores a whole response in one
pass).
"""

from __future__ import annotations

import torch as th

from agents.policy.extractor import last_token_index, lm_hidden_states


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


def last_token_features(lm, input_ids: th.Tensor, attention_mask: th.Tensor) -> th.Tensor:
    """Each row's final hidden state at its last real token, one forward per covering row.

    :param lm: a transformers causal LM (see :func:`agents.policy.extractor.lm_hidden_states`).
    :param input_ids: ``(B, L)`` integer token ids.
    :param attention_mask: ``(B, L)`` 0/1, one contiguous block of ones per row.
    :return: ``float32 (B, hidden_size)`` (whatever the LM's dtype), equal (up to float rounding) to
        running every row alone.
    """
    ids, mask = input_ids.long(), attention_mask.long()
    groups, group_of_row = th.unique(covering_rows(ids, mask), return_inverse=True)
    hidden, offset = lm_hidden_states(lm, ids[groups], mask[groups])
    return hidden[group_of_row, last_token_index(mask) - offset].float()
