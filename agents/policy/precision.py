"""Low-precision LMs (bfloat16, float16) trained with float32 master weights.

A bfloat16 weight has an 8-bit significand: a weight of magnitude ``w`` only changes when an
update exceeds about ``w * 2**-9``. Adam moves every weight by about the learning rate per step,
so at a fine-tuning rate (1e-5) on weights of magnitude ~0.02-0.1 nearly every update of a pure
bfloat16 model rounds away and training silently does nothing. Mixed-precision training keeps a
float32 "master" copy of each low-precision parameter for the optimizer (Micikevicius et al. 2018,
"Mixed Precision Training"): forward and backward run in the low precision, the gradients are
copied into the float32 masters, the optimizer steps the masters, and the result is rounded back
into the model's weights.

:class:`MasterWeights` does this around any ``torch.optim.Optimizer`` with its step pre- and
post-hooks, so SB3's own ``optimizer.zero_grad()``/``clip_grad_norm_``/``optimizer.step()``
sequence in ``PPO.train`` runs unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch as th


def output_logits(lm, features: th.Tensor, logit_mask: th.Tensor | None = None) -> th.Tensor:
    """Next-token logits from trunk features through the LM's own output head, as float32.

    :param lm: a transformers causal LM (any dtype).
    :param features: ``(B, hidden_size)`` final hidden states (any float dtype; cast to the head's).
    :param logit_mask: bool ``(vocab,)``: token ids whose logits are set to float32's minimum, so
        that a softmax gives them no mass (a policy's :attr:`agents.TransformerPolicy.logit_mask`).
    :return: ``float32 (B, vocab)``.
    """
    head = lm.get_output_embeddings()
    logits = head(features.to(head.weight.dtype)).float()
    return logits if logit_mask is None else logits.masked_fill(logit_mask, th.finfo(logits.dtype).min)


class MasterWeights:
    """Float32 master copies of a model's low-precision parameters, for its optimizer.

    Build the optimizer over :attr:`masters` and call :meth:`attach` on it. Float32 parameters
    are their own masters (no copy). Before each ``optimizer.step()`` the low-precision
    gradients are moved into the masters' ``.grad`` (as float32; the parameters' own ``.grad``
    is cleared); after it, the masters are copied (rounded) into the parameters in place, which
    bumps their version counters (so :class:`agents.policy.kv_cache.RolloutKVCache` sees the change).

    The masters live only in memory: a model saved and loaded again restarts from its rounded
    low-precision weights (the optimizer's moments are saved as usual).

    :param parameters: the trainable parameters (any float dtypes).
    """

    def __init__(self, parameters: Iterable[th.nn.Parameter]):
        self.pairs = []
        for p in parameters:
            master = p if p.dtype == th.float32 else th.nn.Parameter(p.detach().float().clone())
            self.pairs.append((p, master))

    @property
    def masters(self) -> list[th.nn.Parameter]:
        """The parameters the optimizer should hold: float32, one per model parameter, same order."""
        return [master for _, master in self.pairs]

    @property
    def low_precision(self) -> int:
        """How many parameters have a separate float32 master."""
        return sum(p is not master for p, master in self.pairs)

    def attach(self, optimizer: th.optim.Optimizer) -> None:
        """Register the gradient copy (step pre-hook) and the write-back (step post-hook) on ``optimizer``."""
        optimizer.register_step_pre_hook(self._copy_gradients)
        optimizer.register_step_post_hook(self._copy_weights)

    def _copy_gradients(self, optimizer, args, kwargs) -> None:
        for p, master in self.pairs:
            if p is not master:
                if master.device != p.device:  # the model was moved (policy.to(device)) after the optimizer was built
                    master.data = master.data.to(p.device)
                master.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @th.no_grad()
    def _copy_weights(self, optimizer, args, kwargs) -> None:
        for p, master in self.pairs:
            if p is not master:
                p.copy_(master)
