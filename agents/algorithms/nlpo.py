"""NLPO (Ramamurthy et al. 2023, RL4LMs) on upstream sb3-contrib ``MaskablePPO``.

NLPO is PPO whose policy may only pick, at every step, a token from the top-``p`` nucleus of a
*masking policy*: a frozen copy of the policy, refreshed every ``target_update_iterations``
rollouts (RL4LMs' ``mask_type="learned_top_p"``, ``top_mask``, ``target_update_iterations``). The
pieces, each usable with upstream ``sb3_contrib.MaskablePPO`` unchanged:

- :class:`MaskableTransformerPolicy`: :class:`agents.TransformerPolicy` that takes sb3-contrib's
  ``action_masks=`` arguments, combines the env's masks (an ``action_masks()`` env method) with
  its own token mask and the NLPO nucleus, and keeps the masking LM;
- :class:`MaskableEpisodeRolloutBuffer`: :class:`agents.EpisodeRolloutBuffer` (one transformer
  forward per episode in the update) that stores the masks each transition was sampled with, one
  bit per token (``np.packbits``), instead of sb3-contrib's float32 per token;
- :class:`NLPOCallback`: hands the policy's masks to the buffer and refreshes the masking policy
  at the start of every ``target_update_iterations``-th rollout;
- :func:`nlpo_kwargs`: the ``MaskablePPO`` arguments, from :func:`agents.text_ppo_kwargs`.

Design decisions:

- *Stored, not recomputed.* The update uses the very masks the rollout sampled with, read back
  from the buffer. Recomputing them from the frozen masking LM would need the update's forward
  (one per episode, padded) to reproduce the rollout's KV-cached one bit for bit, or a token at
  the edge of the nucleus could flip in or out, and a flipped sampled token makes PPO's ratio 0.
  Cost: ``ceil(vocab / 8)`` bytes per transition (6,144 for SmolLM2's 49,152 tokens; sb3-contrib
  stores 196,608).
- *Refresh at rollout start.* Masks are stored, so a refresh cannot change an update's masks; it
  still happens only at the start of a rollout (after the previous update), never between a
  rollout and its update, so that rollout ``r`` samples from the nucleus of the policy as it was at
  the start of rollout ``N * floor(r / N)``. RL4LMs copies the policy after rollout ``k`` but
  before its update; this copy includes that update.
- *LoRA.* The masking LM is a deep copy of ``policy.lm`` that shares every frozen tensor with it:
  with LoRA the base weights are shared and only the adapters (and what else trains) are copied;
  without LoRA the whole LM is copied (RL4LMs' ``deepcopy``).
- *KL penalty.* :class:`agents.KLPenaltyCallback` works unchanged. Its ``log pi`` is the log-prob
  the rollout stored, i.e. of the masked policy (renormalised over the allowed tokens), which is
  the distribution the text was sampled from; its reference is not masked, as in RL4LMs. (RL4LMs
  subtracts the reference from the *unmasked* policy's log-prob; ours is larger by
  ``-log pi(allowed tokens) >= 0`` per token.)
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer, MaskableDictRolloutBufferSamples
from sb3_contrib.common.maskable.distributions import MaskableCategoricalDistribution
from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy
from sb3_contrib.common.maskable.utils import is_masking_supported
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

from agents.algorithms.buffers import EpisodeRolloutBuffer
from agents.algorithms.defaults import text_ppo_kwargs
from agents.policy import TransformerPolicy
from agents.policy.kv_cache import RolloutKVCache
from agents.policy.precision import output_logits
from agents.policy.prefix_sharing import last_token_features

NLPO_FIX = ("train NLPO with sb3_contrib.MaskablePPO(MaskableTransformerPolicy, env, **agents.nlpo_kwargs()) "
            "and model.learn(..., callback=agents.NLPOCallback())")
"""How to set NLPO up, quoted by the errors below."""

NUCLEUS_CANDIDATES = 1024
"""Tokens :func:`nucleus_mask` sorts first; all of them only when these do not reach ``top_p``."""

_POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(1)
"""Set bits of each byte value 0..255."""


def nucleus_mask(logits: th.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> th.Tensor:
    """The top-``p`` nucleus of each row: the most likely tokens whose probability reaches ``top_p``.

    Nucleus sampling's set (Holtzman et al. 2020), as RL4LMs' ``learned_top_p`` mask builds it:
    tokens sorted by probability are kept while the mass *before* them is below ``top_p``, so the
    token that reaches ``top_p`` is kept, and at least ``min_tokens_to_keep`` tokens are. Ties are
    broken by ``torch.topk``/``torch.sort`` order. Only the :data:`NUCLEUS_CANDIDATES` most likely
    tokens are sorted when they reach ``top_p`` in every row (a full sort of SmolLM2's 49,152
    tokens costs 22 ms per 8 rows on one CPU thread, ``topk`` 3 ms); the set is the same (up to
    float rounding of the cumulative sum at the nucleus' edge).

    :param logits: ``(B, vocab)`` float logits (``-inf`` or the dtype's minimum for excluded tokens).
    :param top_p: probability mass to cover, in ``(0, 1]``. (``1.0`` can still drop the least
        likely tokens where the float32 cumulative sum reaches 1 early; the policy does not call
        this at ``top_p=1.0``.)
    :param min_tokens_to_keep: the ``k`` most likely tokens are always kept, ``>= 1``.
    :return: bool ``(B, vocab)``, True for tokens in the nucleus.
    """
    probs = logits.float().softmax(-1)
    probs_sorted, order = probs.topk(min(probs.shape[-1], max(NUCLEUS_CANDIDATES, min_tokens_to_keep)), dim=-1)
    cumulative = probs_sorted.cumsum(-1)
    if probs_sorted.shape[-1] < probs.shape[-1] and not bool((cumulative[:, -1] >= top_p).all()):
        probs_sorted, order = probs.sort(dim=-1, descending=True)
        cumulative = probs_sorted.cumsum(-1)
    mass_before = th.cat([th.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
    keep = mass_before < top_p
    keep[:, :min_tokens_to_keep] = True
    return th.zeros_like(probs, dtype=th.bool).scatter(-1, order, keep)


def shared_frozen_copy(lm: th.nn.Module) -> th.nn.Module:
    """A frozen deep copy of ``lm`` that shares every tensor ``lm`` does not train.

    Parameters with ``requires_grad=False`` (a LoRA model's base weights) are the same tensor
    objects in the copy; trainable ones (adapters, or every weight without LoRA) and buffers are
    copied. The copy is in eval mode with ``requires_grad=False`` everywhere.

    :param lm: a torch module (a transformers causal LM).
    :return: the copy.
    """
    shared = {id(p): p for p in lm.parameters() if not p.requires_grad}
    return copy.deepcopy(lm, memo=shared).requires_grad_(False).eval()


def _check_nlpo_args(top_p: float, target_update_iterations: int, min_tokens_to_keep: int,
                     stop_token_ids: list[int] | None, vocab: int) -> None:
    """:raises ValueError: see :class:`MaskableTransformerPolicy`."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: the nucleus covers a probability mass in (0, 1]; pass e.g. "
                         "top_p=0.9 (RL4LMs' default), or top_p=1.0 to turn NLPO's masking off")
    for name, value in (("target_update_iterations", target_update_iterations),
                        ("min_tokens_to_keep", min_tokens_to_keep)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"{name}={value!r}: must be an integer >= 1 (e.g. target_update_iterations=20, "
                             "RL4LMs' setting: refresh the masking policy every 20 rollouts)")
    bad = [i for i in stop_token_ids or () if not 0 <= int(i) < vocab]
    if bad:
        raise ValueError(f"stop_token_ids holds {bad}, not token ids in [0, {vocab}); pass ids of the "
                         "tokenizer, or None for its EOS and end-of-turn tokens")


def _check_built_with_nlpo_kwargs(frame: Any) -> None:
    """Raise ``ValueError`` when a ``MaskablePPO`` builds this policy without any rollout buffer class.

    ``MaskablePPO`` builds its policy before its rollout buffer and hands the policy nothing of
    itself, so the constructing algorithm is found among the callers (``self`` of
    ``MaskablePPO._setup_model``). Without this check a model built without :func:`nlpo_kwargs`
    fails only in ``learn()``, with sb3-contrib's "Environment does not support action masking.
    Consider using ActionMasker wrapper", which points away from the fix. An explicit
    ``rollout_buffer_class`` is left alone (its errors come at ``learn``, see :class:`NLPOCallback`).

    :param frame: this constructor's frame (``None`` where the interpreter has none: no check).
    """
    for _ in range(4):  # __init__ <- (a subclass's __init__) <- MaskablePPO._setup_model
        frame = frame.f_back if frame is not None else None
        algorithm = frame.f_locals.get("self") if frame is not None else None
        if isinstance(algorithm, MaskablePPO):
            if algorithm.rollout_buffer_class is None:
                raise ValueError("MaskablePPO(MaskableTransformerPolicy, env) was built without NLPO's rollout buffer: "
                                 "build it with MaskablePPO(MaskableTransformerPolicy, env, **agents.nlpo_kwargs()) "
                                 "and train with model.learn(n, callback=agents.NLPOCallback(), use_masking=False) "
                                 "(TextGen envs have no action_masks(); NLPO's masks come from the policy)")
            return


class MaskableTransformerPolicy(TransformerPolicy):
    """:class:`agents.TransformerPolicy` for sb3-contrib's ``MaskablePPO``, with NLPO's nucleus mask.

    The allowed tokens of a step are the intersection of

    - the env's mask, when ``MaskablePPO`` passes one (``action_masks=``; an env method
      ``action_masks()`` returning bool ``(vocab,)``, True = allowed, as sb3-contrib expects);
    - the policy's own :attr:`logit_mask` (see :class:`agents.TransformerPolicy`);
    - with ``top_p < 1``: NLPO's nucleus (:func:`nucleus_mask`) of the *masking policy*
      (:attr:`masking_lm`, a frozen copy of :attr:`lm`), whose distribution is first restricted to
      the two masks above, joined with the stop tokens (``stop_token_ids``), which therefore stay
      allowed unless one of the two masks forbids them. RL4LMs keeps every special token allowed;
      here only the stop tokens are (``forbid_special_tokens`` governs the others).

    Every distribution the policy builds is renormalised over that set (masked logits are set to
    -1e8 by sb3-contrib's ``MaskableCategorical``): ``forward`` (the rollout, KV-cached as in the
    parent; the masking LM keeps its own :class:`agents.policy.kv_cache.RolloutKVCache`),
    ``get_distribution`` and ``predict`` (the masking LM recomputes the nucleus with one forward per
    episode), and ``evaluate_actions``, which with ``top_p < 1`` takes the masks the rollout used
    from :class:`MaskableEpisodeRolloutBuffer` and never recomputes them (see :mod:`agents.algorithms.nlpo`).
    :attr:`last_action_masks` holds the masks of the last ``forward`` for that buffer.

    The masking LM is built at construction as a copy of the LM (sharing the frozen base weights
    with LoRA, see :func:`shared_frozen_copy`), refreshed by :meth:`start_rollout` (which
    :class:`NLPOCallback` calls at the start of every rollout) every ``target_update_iterations``
    rollouts, and after every ``load_state_dict`` (``MaskablePPO.load`` included): the copy is not
    saved, so a loaded policy's masking policy is the loaded policy. It is no submodule: it is not
    in ``state_dict()`` nor among the parameters, and it follows the policy's device when used.

    sb3-contrib's ``MaskablePPO`` requires an instance of its ``MaskableActorCriticPolicy``, whose
    constructor cannot share an MRO with SB3's ``ActorCriticPolicy``; this class is registered as
    its virtual subclass (``ABCMeta.register``) and implements its interface (``predict`` is
    sb3-contrib's own).

    :param observation_space: as :class:`agents.TransformerPolicy`.
    :param action_space: as :class:`agents.TransformerPolicy`.
    :param lr_schedule: SB3 learning-rate schedule.
    :param top_p: probability mass of the masking policy's nucleus, in ``(0, 1]`` (RL4LMs'
        ``top_mask``, 0.9); ``1.0`` turns NLPO's masking off (no masking LM): the policy then only
        applies the env's masks and its own.
    :param target_update_iterations: refresh the masking policy every this many rollouts, ``>= 1``
        (RL4LMs' name; its configs use 20).
    :param min_tokens_to_keep: the nucleus holds at least this many tokens, ``>= 1`` (RL4LMs' class
        default is 100, which on a small vocabulary keeps everything).
    :param stop_token_ids: tokens always allowed over the nucleus; ``None``: the tokenizer's EOS and,
        with a chat template, its end-of-turn token (:func:`textgym.chat.stop_token_ids`).
    :param kwargs: :class:`agents.TransformerPolicy` arguments.
    :raises ValueError: ``top_p`` outside ``(0, 1]``, ``target_update_iterations`` or
        ``min_tokens_to_keep`` not an integer ``>= 1``, a stop token id outside the vocabulary,
        ``top_p < 1`` in a ``MaskablePPO`` built without :func:`nlpo_kwargs` (no
        ``rollout_buffer_class``: the message names ``nlpo_kwargs()`` and ``use_masking=False``)
        (all checked before the LM is loaded); and what :class:`agents.TransformerPolicy` raises.
    """

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, lr_schedule: Schedule,
                 top_p: float = 0.9, target_update_iterations: int = 20, min_tokens_to_keep: int = 1,
                 stop_token_ids: list[int] | None = None, **kwargs: Any):
        _check_nlpo_args(top_p, target_update_iterations, min_tokens_to_keep, stop_token_ids,
                         int(getattr(action_space, "n", 0)))
        if top_p < 1:
            _check_built_with_nlpo_kwargs(inspect.currentframe())
        self.top_p = float(top_p)
        self.target_update_iterations = int(target_update_iterations)
        self.min_tokens_to_keep = int(min_tokens_to_keep)
        self.stop_token_ids = None if stop_token_ids is None else [int(i) for i in stop_token_ids]
        self.rollout_count = 0
        """Rollouts started through :meth:`start_rollout` since construction (not in the zip; exact resume
        keeps it, :func:`agents.save_training_state`)."""
        self.masking_refreshes: list[int] = []
        """The values of :attr:`rollout_count` at which :meth:`start_rollout` refreshed the masking LM."""
        self.last_action_masks: th.Tensor | None = None
        """Bool ``(B, vocab)`` allowed tokens of the last ``forward`` (``None``: nothing masked)."""
        self.mask_buffer_attached = False
        """Whether a :class:`MaskableEpisodeRolloutBuffer` records this policy's masks (set by its ``attach``)."""
        super().__init__(observation_space, action_space, lr_schedule, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        self.action_dist = MaskableCategoricalDistribution(int(self.action_space.n))
        super()._build(lr_schedule)
        self.register_buffer("stop_mask", self._stop_mask(), persistent=False)
        # Not a registered submodule: no second copy in state_dict(), the optimizer or TRPO's parameters.
        vars(self)["masking_lm"] = None if self.top_p == 1.0 else shared_frozen_copy(self.lm)
        self.masking_cache = RolloutKVCache(self.masking_lm) if self.masking_lm is not None and self.kv_cache else None
        if self.masking_lm is not None:
            self.register_load_state_dict_post_hook(self._refresh_after_load)

    def _stop_mask(self) -> th.Tensor:
        """Bool ``(vocab,)``: True for the tokens allowed over the nucleus (see ``stop_token_ids``)."""
        ids = self.stop_token_ids
        if ids is None:
            from textgym.chat import stop_token_ids
            from textgym.env import load_tokenizer

            tokenizer = load_tokenizer(getattr(self.observation_space, "model_name_or_path", None)
                                       or self.model_name_or_path)
            ids = stop_token_ids(tokenizer, -1, chat_template=bool(getattr(tokenizer, "chat_template", None)))
        mask = th.zeros(int(self.action_space.n), dtype=th.bool)
        mask[sorted(ids)] = True
        return mask

    # --- the masking policy -------------------------------------------------------------------

    def start_rollout(self) -> bool:
        """Count a rollout; at the start of rollouts ``0, N, 2N, ...`` (``N = target_update_iterations``)
        first copy the policy's current weights into the masking LM.

        :return: whether the masking LM was refreshed.
        """
        refresh = self.rollout_count % self.target_update_iterations == 0
        if refresh and self.masking_lm is not None:
            self._copy_into_masking_lm()
            self.masking_refreshes.append(self.rollout_count)
        self.rollout_count += 1
        return refresh and self.masking_lm is not None

    def masking_lm_own_tensors(self) -> dict[str, th.Tensor]:
        """The masking LM's parameters and buffers that are not :attr:`lm`'s own (by identity), by
        name, tied weights once: all of them under full fine-tuning, the adapters under LoRA; ``{}``
        without a masking LM."""
        if self.masking_lm is None:
            return {}
        shared = _named_tensors(self.lm)
        return {name: tensor for name, tensor in _named_tensors(self.masking_lm).items() if tensor is not shared[name]}

    @th.no_grad()
    def _copy_into_masking_lm(self) -> None:
        """Copy every tensor the masking LM does not share with :attr:`lm` (in place, any device)."""
        sources = _named_tensors(self.lm)
        for name, tensor in self.masking_lm_own_tensors().items():
            tensor.copy_(sources[name])

    def set_training_mode(self, mode: bool) -> None:
        """The parent's switch; also drops the masking LM's rollout KV cache."""
        super().set_training_mode(mode)
        if self.masking_cache is not None:
            self.masking_cache.clear()

    def keep_rollout_rows(self, rows: th.Tensor) -> None:
        """The parent's row selection, applied to the masking LM's rollout KV cache as well."""
        super().keep_rollout_rows(rows)
        if self.masking_cache is not None:
            self.masking_cache.keep_rows(rows)

    def _refresh_after_load(self, module, incompatible_keys) -> None:
        # load_state_dict (SB3's MaskablePPO.load / set_parameters) changed the policy: the masking
        # copy is not saved, so it becomes the loaded policy.
        self._copy_into_masking_lm()

    def _masking_logits(self, obs: PyTorchObs, rollout: bool) -> th.Tensor:
        """The masking policy's float32 ``(B, vocab)`` logits, :attr:`logit_mask` applied."""
        lm = self.masking_lm
        if next(lm.parameters()).device != self.device:  # the policy was moved after construction
            lm.to(self.device)
        ids, mask = obs["input_ids"], obs["attention_mask"]
        with th.no_grad():
            if rollout and self.masking_cache is not None:
                features = self.masking_cache.features(ids, mask)
            else:
                features = last_token_features(lm, ids, mask)
            return output_logits(lm, features, self.logit_mask)

    def allowed_tokens(self, obs: PyTorchObs, env_masks: Any = None, rollout: bool = False) -> th.Tensor | None:
        """The allowed tokens of a batch (see the class doc), or ``None`` when nothing is masked.

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param env_masks: the env's masks, ``(B, vocab)`` (or flat), any dtype (nonzero = allowed),
            numpy or torch; ``None``: none.
        :param rollout: compute the nucleus through the masking LM's KV cache (as ``forward`` does
            in a rollout) instead of a full forward.
        :return: bool ``(B, vocab)`` on the policy's device, True = allowed.
        :raises ValueError: a row allows no token (the env's mask and :attr:`logit_mask` exclude
            every token).
        """
        batch, vocab = obs["input_ids"].shape[0], int(self.action_space.n)
        env = None if env_masks is None else th.as_tensor(env_masks, device=self.device).reshape(batch, vocab) != 0
        allowed = env
        if self.masking_lm is not None:
            logits = self._masking_logits(obs, rollout)
            if env is not None:
                logits = logits.masked_fill(~env, th.finfo(logits.dtype).min)
            allowed = nucleus_mask(logits, self.top_p, self.min_tokens_to_keep) | self.stop_mask
            if env is not None:
                allowed &= env
        if allowed is not None and self.logit_mask is not None:
            allowed = allowed & ~self.logit_mask
        if allowed is not None and not allowed.any(-1).all():
            rows = (~allowed.any(-1)).nonzero().flatten().tolist()
            raise ValueError(f"rows {rows} allow no token: the env's action_masks() allow only tokens the policy "
                             "forbids (logit_mask); allow at least one token the policy may sample")
        return allowed

    # --- the distributions ---------------------------------------------------------------------

    def forward(self, obs: PyTorchObs, deterministic: bool = False,
                action_masks: Any = None) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Sample actions with values and log-probs, as ``MaskablePPO.collect_rollouts`` calls it.

        As :meth:`agents.TransformerPolicy.forward` (KV-cached without grad in eval mode), with the
        allowed tokens of :meth:`allowed_tokens` applied; they are kept in :attr:`last_action_masks`.

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param deterministic: take the most likely allowed token instead of sampling.
        :param action_masks: the env's masks (``MaskablePPO`` passes ``get_action_masks(env)`` when
            ``use_masking``), ``(B, vocab)``; ``None``: none.
        :return: ``actions`` int64 ``(B,)``, ``values`` float32 ``(B, 1)``, ``log_prob`` float32 ``(B,)``.
        """
        rollout = self.kv_cache and not self.training and not th.is_grad_enabled()
        if rollout:
            features = self.rollout_cache.features(obs["input_ids"], obs["attention_mask"])
        else:
            features = self.extract_features(obs)
        latent_pi, latent_vf = self.mlp_extractor(features)
        distribution = self._get_action_dist_from_latent(latent_pi)
        self.last_action_masks = self.allowed_tokens(obs, action_masks, rollout=rollout)
        if self.last_action_masks is not None:
            distribution.apply_masking(self.last_action_masks)
        actions = distribution.get_actions(deterministic=deterministic)
        values, log_prob = self.value_net(latent_vf), distribution.log_prob(actions)
        return actions.reshape((-1, *self.action_space.shape)), values, log_prob

    def get_distribution(self, obs: PyTorchObs, action_masks: Any = None) -> MaskableCategoricalDistribution:
        """The masked action distribution (sb3-contrib's ``get_distribution``; ``predict`` calls it).

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param action_masks: the env's masks ``(B, vocab)``, or ``None``.
        :return: sb3-contrib's ``MaskableCategoricalDistribution`` over ``(B, vocab)`` float32 logits.
        """
        distribution = super().get_distribution(obs)
        masks = self.allowed_tokens(obs, action_masks)
        if masks is not None:
            distribution.apply_masking(masks)
        return distribution

    def _predict(self, observation: PyTorchObs, deterministic: bool = False, action_masks: Any = None) -> th.Tensor:
        return self.get_distribution(observation, action_masks).get_actions(deterministic=deterministic)

    predict = MaskableActorCriticPolicy.predict

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor,
                         action_masks: th.Tensor | None = None) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Values, log-probs and entropies of ``actions`` under the masks they were sampled with.

        One transformer forward per episode with ``share_prefix_forward`` (as the parent). The masks
        are applied as given: with ``top_p < 1`` they must be the rollout's own, which
        :class:`MaskableEpisodeRolloutBuffer` stores; without NLPO, ``None`` or the env's masks
        (sb3-contrib's buffers work too) are combined with :attr:`logit_mask` as in the rollout.

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param actions: ``(B,)`` token ids.
        :param action_masks: ``(B, vocab)`` masks of the minibatch (nonzero = allowed).
        :return: ``values`` float32 ``(B, 1)``, ``log_prob`` float32 ``(B,)``, ``entropy`` float32 ``(B,)``.
        :raises RuntimeError: ``top_p < 1`` and no :class:`MaskableEpisodeRolloutBuffer` recorded the
            rollout's masks (``NLPOCallback`` missing, or another buffer or algorithm).
        """
        if self.masking_lm is not None and (action_masks is None or not self.mask_buffer_attached):
            raise RuntimeError("NLPO's update must use the masks its rollout sampled with, which only "
                               f"MaskableEpisodeRolloutBuffer records, linked by NLPOCallback: {NLPO_FIX}")
        if self.share_prefix_forward and not self._grouping_checked:
            self._grouping_checked = True
            self._warn_if_ungrouped(obs["input_ids"], obs["attention_mask"])
        latent_pi, latent_vf = self.mlp_extractor(self._features(obs))
        distribution = self._get_action_dist_from_latent(latent_pi)
        # Without NLPO the rollout's masks are a function of the env's: recombining them is exact.
        masks = action_masks if self.masking_lm is not None else self.allowed_tokens(obs, action_masks)
        if masks is not None:
            distribution.apply_masking(masks)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(top_p=self.top_p, target_update_iterations=self.target_update_iterations,
                    min_tokens_to_keep=self.min_tokens_to_keep, stop_token_ids=self.stop_token_ids)
        return data


MaskableActorCriticPolicy.register(MaskableTransformerPolicy)


class MaskableEpisodeRolloutBuffer(EpisodeRolloutBuffer):
    """:class:`agents.EpisodeRolloutBuffer` that stores each transition's allowed tokens as bits.

    ``add`` (called by ``MaskablePPO.collect_rollouts`` right after the policy's ``forward``) reads
    the masks the policy sampled with from the attached policy's
    :attr:`MaskableTransformerPolicy.last_action_masks` (bool ``(n_envs, vocab)``; ``None`` = all
    allowed), checks that they allow the actions taken, and packs them with ``np.packbits`` into
    :attr:`action_mask_bits`, uint8 ``(n_steps, n_envs, ceil(vocab / 8))``. The env's masks that
    ``MaskablePPO`` passes are already inside the policy's. Samples are sb3-contrib's
    ``MaskableDictRolloutBufferSamples`` whose ``action_masks`` are the unpacked bool
    ``(batch, vocab)`` masks, exactly the rollout's; minibatches hold whole episodes, as the
    parent's. :attr:`bytes_per_transition` counts the bits: ``ceil(vocab / 8)`` bytes per
    transition on top of the parent's (6,144 for a 49,152-token vocabulary, against 196,608 in
    sb3-contrib's ``MaskableDictRolloutBuffer``: 3.2 GB at ``n_steps=2048`` with 8 envs).

    Attach the policy with :meth:`attach`; :class:`NLPOCallback` does it at training start.
    ``MaskablePPO`` asserts that its buffer is a ``MaskableDictRolloutBuffer``, whose ``reset``
    would allocate those float32 masks; this class is registered as its virtual subclass instead.

    :param buffer_size: ``n_steps`` (SB3).
    :param observation_space: token-window ``Dict`` space.
    :param action_space: ``Discrete(vocab)``.
    :param device: torch device of the samples.
    :param gae_lambda: GAE's lambda.
    :param gamma: discount.
    :param n_envs: number of envs.
    :raises ValueError: the action space is not ``Discrete``.
    """

    def __init__(self, buffer_size: int, observation_space: spaces.Space, action_space: spaces.Space,
                 device: th.device | str = "auto", gae_lambda: float = 1.0, gamma: float = 0.99, n_envs: int = 1):
        if not isinstance(action_space, spaces.Discrete):
            raise ValueError(f"MaskableEpisodeRolloutBuffer masks token ids: it needs a Discrete action space, "
                             f"got {action_space}")
        self.policy: MaskableTransformerPolicy | None = None
        self.mask_dims = int(action_space.n)
        super().__init__(buffer_size, observation_space, action_space, device, gae_lambda, gamma, n_envs)

    def attach(self, policy: MaskableTransformerPolicy) -> None:
        """Record ``policy``'s masks from now on (and tell the policy that they are recorded)."""
        self.policy = policy
        policy.mask_buffer_attached = True

    def reset(self) -> None:
        """SB3's (compact) storage plus zeroed mask bits."""
        super().reset()
        self.action_mask_bits = np.zeros((self.buffer_size, self.n_envs, (self.mask_dims + 7) // 8), dtype=np.uint8)

    def add(self, obs, action, reward, episode_start, value, log_prob, action_masks: Any = None) -> None:
        """Store a step and the masks the attached policy sampled it with.

        :param action_masks: the env's masks as ``MaskablePPO`` passes them; not stored separately,
            the policy's masks include them.
        :raises RuntimeError: no policy is attached, its masks do not match the batch, or they
            forbid an action taken (the policy ran again between its step and ``add``).
        """
        if self.policy is None:
            raise RuntimeError(f"MaskableEpisodeRolloutBuffer has no policy to read masks from: {NLPO_FIX}")
        masks = self.policy.last_action_masks
        if masks is None:
            masks = np.ones((self.n_envs, self.mask_dims), dtype=bool)
        else:
            masks = masks.cpu().numpy()
        taken = np.asarray(action).reshape(-1).astype(np.int64)
        if masks.shape != (self.n_envs, self.mask_dims) or not masks[np.arange(self.n_envs), taken].all():
            raise RuntimeError("the policy's last masks are not those of this step's actions: was the policy "
                               "called between its rollout step and the buffer's add?")
        self.action_mask_bits[self.pos] = np.packbits(masks, axis=-1)
        super().add(obs, action, reward, episode_start, value, log_prob)

    @property
    def bytes_per_transition(self) -> float:
        """The parent's bytes per transition plus the mask bits (``ceil(vocab / 8)``)."""
        return super().bytes_per_transition + self.action_mask_bits.nbytes / (self.buffer_size * self.n_envs)

    def allowed_counts(self) -> np.ndarray:
        """Allowed tokens per stored transition: int64 ``(n_steps, n_envs)``, or ``(n_envs * n_steps,)``
        once :meth:`get` has flattened the buffer."""
        return _POPCOUNT[self.action_mask_bits].sum(-1)

    def get(self, batch_size: int | None = None):
        """The parent's minibatches of whole episode segments, with their masks (see the class doc)."""
        if not self.generator_ready:
            self.action_mask_bits = self.swap_and_flatten(self.action_mask_bits)
        yield from super().get(batch_size)

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> MaskableDictRolloutBufferSamples:
        samples = super()._get_samples(batch_inds, env)
        masks = np.unpackbits(self.action_mask_bits[batch_inds], axis=-1, count=self.mask_dims).astype(bool)
        return MaskableDictRolloutBufferSamples(**samples._asdict(),
                                                action_masks=th.as_tensor(masks, device=self.device))


MaskableDictRolloutBuffer.register(MaskableEpisodeRolloutBuffer)


class NLPOCallback(BaseCallback):
    """Links the rollout buffer to the policy and refreshes NLPO's masking policy (SB3 callback).

    Pass it to ``MaskablePPO.learn`` (next to :class:`agents.KLPenaltyCallback` if wanted). At
    training start it attaches the policy to the buffer (:meth:`MaskableEpisodeRolloutBuffer.attach`);
    at the start of every rollout it calls :meth:`MaskableTransformerPolicy.start_rollout`, which
    refreshes the masking LM at rollouts ``0, N, 2N, ...`` of the policy's life (the count survives
    separate ``learn`` calls), so never between a rollout and its update. After each rollout it logs
    ``nlpo/allowed_tokens`` (mean allowed tokens per step) and ``nlpo/masking_refreshes`` (refreshes
    so far).

    :param verbose: SB3 verbosity.
    :raises TypeError: (at training start) the algorithm is not ``MaskablePPO``, the policy not a
        :class:`MaskableTransformerPolicy` or the buffer not a :class:`MaskableEpisodeRolloutBuffer`.
    :raises ValueError: (at training start) ``learn(use_masking=True)`` on envs without an
        ``action_masks()`` method.
    """

    def _init_callback(self) -> None:
        checks = ((self.model, MaskablePPO, "the algorithm"),
                  (self.model.policy, MaskableTransformerPolicy, "the policy"),
                  (self.model.rollout_buffer, MaskableEpisodeRolloutBuffer, "the rollout buffer"))
        for obj, cls, what in checks:
            if not isinstance(obj, cls):
                raise TypeError(f"NLPOCallback: {what} is a {type(obj).__name__}, not a {cls.__name__}; {NLPO_FIX}")
        self.model.rollout_buffer.attach(self.model.policy)

    def _on_training_start(self) -> None:
        if self.locals.get("use_masking") and not is_masking_supported(self.training_env):
            raise ValueError("the envs have no action_masks() method (TextGen envs have none): call "
                             "model.learn(..., use_masking=False); NLPO's masks come from the policy, "
                             "use_masking only adds the env's")

    def _on_rollout_start(self) -> None:
        self.model.policy.start_rollout()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.logger.record("nlpo/allowed_tokens", float(self.model.rollout_buffer.allowed_counts().mean()))
        self.logger.record("nlpo/masking_refreshes", len(self.model.policy.masking_refreshes))


def nlpo_kwargs(top_p: float = 0.9, target_update_iterations: int = 20, **overrides: Any) -> dict[str, Any]:
    """``MaskablePPO`` keyword arguments for NLPO: :func:`agents.text_ppo_kwargs` with
    ``rollout_buffer_class=MaskableEpisodeRolloutBuffer`` and the NLPO policy arguments.

    ``MaskablePPO(MaskableTransformerPolicy, env, **nlpo_kwargs())``, then
    ``model.learn(n, callback=NLPOCallback(), use_masking=False)`` (``use_masking=True`` for envs
    with an ``action_masks()`` method). ``policy_kwargs`` overrides merge key by key (and win over
    ``top_p`` and ``target_update_iterations``).

    :param top_p: see :class:`MaskableTransformerPolicy`.
    :param target_update_iterations: see :class:`MaskableTransformerPolicy`.
    :param overrides: other arguments, as for :func:`agents.text_ppo_kwargs`.
    :return: a new dict.
    :raises TypeError: an override that ``stable_baselines3.PPO`` does not accept.
    """
    policy_kwargs = {"top_p": top_p, "target_update_iterations": target_update_iterations,
                     **(overrides.pop("policy_kwargs", None) or {})}
    return text_ppo_kwargs(**{"rollout_buffer_class": MaskableEpisodeRolloutBuffer, **overrides,
                              "policy_kwargs": policy_kwargs})


def _named_tensors(module: th.nn.Module) -> dict[str, th.Tensor]:
    """``module``'s parameters and buffers by name (tied ones once, as ``named_parameters`` gives them)."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


__all__ = ["MaskableEpisodeRolloutBuffer", "MaskableTransformerPolicy", "NLPOCallback", "nlpo_kwargs",
           "nucleus_mask", "shared_frozen_copy"]
