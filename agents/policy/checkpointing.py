"""Activation (gradient) checkpointing of a causal LM's decoder layers while it stays in eval mode.

transformers checkpoints a layer only in training mode (``GradientCheckpointingLayer`` checks
``self.training``), but the policy keeps its LM in eval mode so that dropout stays off and PPO's
ratio compares the same function twice. Setting the layers' ``training`` flag instead would switch
on the dropout some layers apply themselves (OPT's decoder layer calls
``nn.functional.dropout(..., training=self.training)``). So this module checkpoints the same layers
(the ones transformers marks as ``GradientCheckpointingLayer``) with
``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` directly, for the duration of one forward
(Chen et al. 2016, "Training deep nets with sublinear memory cost").
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch as th
from torch.utils.checkpoint import checkpoint


def checkpoint_layers(lm: th.nn.Module) -> list[th.nn.Module]:
    """The modules of ``lm`` that transformers can checkpoint (its decoder layers).

    :param lm: a transformers model (``PreTrainedModel``, or peft's wrapper of one).
    :return: the ``transformers.modeling_layers.GradientCheckpointingLayer`` instances, in module order.
    :raises ValueError: ``lm`` has none (an architecture written before transformers marked its
        layers, or a remote-code model): name the fix, ``gradient_checkpointing=False``.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{type(lm).__name__} has no layer that transformers marks as checkpointable "
                         "(GradientCheckpointingLayer); pass gradient_checkpointing=False for this model")
    return layers


@contextlib.contextmanager
def activation_checkpointing(layers: list[th.nn.Module]) -> Iterator[None]:
    """Within the block, each layer's forward keeps only its inputs for the backward pass and recomputes
    its activations there: peak activation memory of a forward with grad drops from every layer's
    intermediates to one layer's plus each layer's input, for one more forward of each layer per backward.

    Exact: the recomputation sees the same inputs and weights, dropout is off in eval mode, and
    torch's non-reentrant checkpoint restores the RNG state anyway. Forwards without grad (rollouts)
    run as usual. The layers' ``forward`` is overridden on the instances only for the block, so no
    copy or pickle of the model (a reference model, a saved policy) ever holds the override; the
    backward may run after the block ends (the checkpoint keeps the function it was given).

    A layer call given a KV cache runs without checkpointing, since the recomputation would append
    the layer's keys and values to the cache a second time, unless the cache stores nothing
    (``stores_updates = False``: :class:`agents.policy.prefix_sharing.FixedPastCache`).

    :param layers: from :func:`checkpoint_layers`.
    """
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, type(layer).forward.__get__(layer))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _checkpointed(forward, *args, **kwargs):
    # A layer that writes a KV cache runs as is: the backward replay would append its keys twice.
    caches = [kwargs[k] for k in ("past_key_values", "cache", "layer_past") if kwargs.get(k) is not None]
    if not th.is_grad_enabled() or any(getattr(cache, "stores_updates", True) for cache in caches):
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
