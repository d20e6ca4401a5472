"""``TransformerPolicy``: an SB3 actor-critic policy whose actor is a pretrained causal LM."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule

from agents.policy.checkpointing import activation_checkpointing, checkpoint_layers
from agents.policy.extractor import CausalLMExtractor
from agents.policy.kv_cache import RolloutKVCache
from agents.policy.lora import add_lora, lora_config_dict
from agents.policy.precision import MasterWeights, output_logits
from agents.policy.prefix_sharing import MIN_SHARED_PREFIX, covering_rows, last_token_features

UNGROUPED_WARNING = (
    "PPO's minibatch of {rows} transitions needed {groups} transformer forwards, whose episodes hold {expected} "
    "steps: it is not grouped by episode. "
    "SB3's default rollout buffer shuffles single transitions, so each costs a forward of its whole window "
    "(SmolLM2: ~4.5 transitions/s, about an hour per iteration at SB3's n_steps=2048 and 10 epochs). Pass "
    "**agents.text_ppo_kwargs() (rollout_buffer_class=EpisodeRolloutBuffer, text-sized n_steps and epochs) "
    "for one forward per episode (docs/performance.md)."
)

VALUE_OPTIMIZER_KEY = "value_optimizer"
"""Key of the value optimizer's state dict inside ``policy.optimizer.state_dict()`` (see
:class:`TransformerPolicy`'s ``value_learning_rate``)."""

OLD_OPTIMIZER_STATE_WARNING = (
    "this optimizer state has no value-head optimizer state (a checkpoint saved before textgym stored it, "
    "with value_learning_rate set): the value head keeps its weights but its optimizer (Adam's moments, step "
    "count) restarts from zero; save the model again to keep it from now on."
)


class TransformerPolicy(ActorCriticPolicy):
    """Actor-critic policy around any Hugging Face causal LM, for upstream SB3 ``PPO`` and ``A2C``.

    Architecture (one shared trunk, as in Ziegler et al. 2019 and TRL's value-head models):

    - features extractor: :class:`~agents.policy.extractor.CausalLMExtractor`, the LM's trunk; features
      are the final hidden state at the last real token, ``float32 (B, hidden_size)``;
    - action net: the LM's own output head (``lm.get_output_embeddings()``), so action logits are
      exactly the LM's next-token logits and go through SB3's ``CategoricalDistribution``;
    - value head (``value_net``): a new ``Linear(hidden_size, 1)``, zero-initialised (V = 0 at
      the start).

    Pretrained weights are never re-initialised (SB3's orthogonal init is off) and dropout is
    always off, so PPO's ratio compares the old and new log-probs of the same function.

    Observations are :class:`textgym.spaces.TokenWindowSpace` dicts; token ids are read as
    integers (no float cast through ``preprocess_obs``).

    :param observation_space: the env's observation space (``Dict`` with ``input_ids`` and
        ``attention_mask``).
    :param action_space: ``Discrete(n)`` with ``n`` equal to the LM's output vocabulary.
    :param lr_schedule: SB3 learning-rate schedule.
    :param model_name_or_path: LM to load; default: the observation space's ``model_name_or_path``,
        i.e. the model whose tokenizer the env uses.
    :param from_pretrained_kwargs: extra ``from_pretrained`` arguments (``revision``, ...).
    :param dtype: the LM's precision, e.g. ``torch.bfloat16`` (or ``"bfloat16"``; the same as
        ``from_pretrained_kwargs=dict(dtype=...)``); default float32. In low precision the LM's
        forward and backward run in that dtype, while the value head, the log-softmax, PPO's ratios
        and losses stay float32, and the optimizer steps float32 master copies of the LM's weights
        (:class:`agents.policy.precision.MasterWeights`; Micikevicius et al. 2018), because Adam's
        fine-tuning-sized updates would mostly round away in bfloat16. LoRA adapters are float32
        already (peft), so a LoRA policy needs no master copies. The masters are not in SB3's zip:
        ``load_state_dict`` (``PPO.load``) restarts them from the loaded, rounded weights;
        :func:`agents.save_training_state` keeps them exactly.
    :param value_learning_rate: learning rate of a separate optimizer (same class and kwargs) for
        the value head; ``None``: one optimizer for everything, at SB3's learning rate. Adam moves
        every weight by about the learning rate per step, so a new value head trained at a
        pretrained LM's fine-tuning rate (~1e-6..1e-5) barely moves and its explained variance
        stays near 0. The value optimizer (``self.value_optimizer``) steps right after SB3's (a step
        hook) at this fixed rate. Its state travels inside ``self.optimizer.state_dict()`` under the
        key :data:`VALUE_OPTIMIZER_KEY`, the one optimizer state SB3's ``save``/``load`` keep
        (``policy.optimizer.pth`` in the zip), so ``PPO.load`` restores both; a zip saved before
        textgym did this loads with a ``UserWarning`` and a fresh value optimizer.
    :param critic: ``False``: no value head. ``value_net`` then returns ``V(s) = 0`` with no
        parameters (so no value optimizer and no gradient from SB3's value loss, which becomes a
        constant), for advantages that need no critic: RLOO and GRPO
        (:class:`agents.GroupRelativeRolloutBuffer`, :func:`agents.group_ppo_kwargs`).
    :param share_prefix_forward: in :meth:`evaluate_actions`, run one forward per group of
        observations that are prefixes of one another (one per episode) instead of one per
        observation; exact, see :mod:`agents.policy.prefix_sharing`.
    :param min_shared_prefix: with ``share_prefix_forward`` and ``kv_cache``, when all of a
        minibatch's episodes begin with at least this many of the same tokens (a system turn, a
        game's rules, an RLOO/GRPO group's prompt), run them once and let each episode attend to
        their keys and values (:func:`agents.policy.prefix_sharing.prefix_then_rest_hidden`); the
        KL penalty's reference pass does the same. Exact. ``None``: never.
    :param kv_cache: during rollouts (``forward`` without grad, eval mode: SB3's
        ``collect_rollouts``), decode incrementally with a per-env KV cache
        (:class:`agents.policy.kv_cache.RolloutKVCache`): one new token per env and step instead of the
        whole window, exact up to float rounding. ``predict``, ``predict_values`` and
        ``evaluate_actions`` never use it; it is dropped at every ``set_training_mode`` call (so
        at the start of every rollout and update) and whenever a weight changed. Checked at
        construction: a model whose KV cache is not a ``DynamicCache`` of full-attention layers
        raises ``RuntimeError`` (pass ``kv_cache=False`` for it).
    :param gradient_checkpointing: in :meth:`evaluate_actions` with grad (PPO's and A2C's update),
        keep only each decoder layer's input for the backward pass and recompute the rest there
        (:mod:`agents.policy.checkpointing`), with the LM still in eval mode (dropout off): the
        update's activation memory shrinks to about one layer's, for one more forward of each layer
        per backward. Exact. For long windows (multi-turn games, chat templates) whose update
        memory, not time, is the limit. Checked at construction: an LM with no layer transformers
        can checkpoint raises ``ValueError``.
    :param lora_config: train LoRA adapters (Hu et al. 2021) instead of the whole LM: a
        ``peft.LoraConfig`` or a dict of its keyword arguments, e.g. ``dict(r=16, lora_alpha=32,
        target_modules=["q_proj", "v_proj"])``. peft injects the adapters into ``self.lm`` in place
        and freezes the LM's own weights (``requires_grad=False``); the value head still trains.
        ``self.peft_model`` is the ``peft.PeftModel`` around ``self.lm`` (``None`` without LoRA):
        :class:`agents.KLPenaltyCallback` then takes the same weights with adapters disabled as its
        reference, without a second LM. Stored as a plain dict (``self.lora_config``), so SB3's
        ``save``/``load`` round-trips it; see :mod:`agents.policy.lora` for saving or merging the adapters.
    :param forbid_special_tokens: never sample a special token (the tokenizer's named special
        tokens and added tokens flagged special: ``<pad>``, ``<|im_start|>``, ...) other than the
        stop tokens, i.e. the tokenizer's EOS and the chat template's end-of-turn token.
    :param forbidden_token_ids: more token ids never to sample.
        Token ids the tokenizer cannot decode (the rows of a vocabulary padded beyond
        ``len(tokenizer)``, as Qwen and Phi pad theirs) are never sampled either. All three are
        one mask (``self.logit_mask``, bool ``(vocab,)``, ``None`` when nothing is masked): the
        masked logits are set to the dtype's minimum in every distribution the policy builds
        (rollout, ``predict``, ``evaluate_actions``), so log-probs, entropies and PPO's ratios
        are those of the policy renormalised over the allowed tokens. The tokenizer is the env's
        (the observation space's ``model_name_or_path``), else the policy model's.
    :param kwargs: other ``ActorCriticPolicy`` arguments (``optimizer_class``, ``optimizer_kwargs``,
        ``net_arch=dict(pi=[], vf=[...])`` for a deeper value head).
    :raises ValueError: the spaces are not token spaces, no model is named, the LM's vocabulary
        differs from the action space, the window exceeds the LM's positions, the LM transforms
        its logits after the output head (checked once on a 3-token input: Gemma-2's
        soft-capping, Cohere's ``logit_scale``), ``ortho_init=True``,
        ``net_arch`` has actor layers (or value layers with ``critic=False``), or ``lora_config``
        targets no layer of the LM.
    :raises TypeError: ``lora_config`` is not a ``LoraConfig``/dict or has an unknown argument.
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        model_name_or_path: str | None = None,
        from_pretrained_kwargs: dict[str, Any] | None = None,
        value_learning_rate: float | None = None,
        critic: bool = True,
        share_prefix_forward: bool = True,
        min_shared_prefix: int | None = MIN_SHARED_PREFIX,
        lora_config: Any = None,
        kv_cache: bool = True,
        gradient_checkpointing: bool = False,
        forbid_special_tokens: bool = False,
        forbidden_token_ids: list[int] | None = None,
        dtype: th.dtype | str | None = None,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        ortho_init: bool = False,
        **kwargs: Any,
    ):
        _check_spaces(observation_space, action_space)
        model_name_or_path = model_name_or_path or getattr(observation_space, "model_name_or_path", None)
        if model_name_or_path is None:
            raise ValueError("no model given: pass policy_kwargs=dict(model_name_or_path=...) "
                             "or use an observation space that records it (textgym's TokenWindowSpace)")
        if ortho_init:
            raise ValueError("ortho_init=True would overwrite the pretrained weights; leave it False")
        net_arch = [] if net_arch is None else net_arch
        if (net_arch.get("pi") if isinstance(net_arch, dict) else net_arch):
            raise ValueError(f"net_arch={net_arch!r} adds actor layers, but the actor is the LM's own "
                             "head; use net_arch=dict(pi=[], vf=[...]) to deepen the value head only")
        if not critic and isinstance(net_arch, dict) and net_arch.get("vf"):
            raise ValueError(f"net_arch={net_arch!r} adds value layers but critic=False; drop one of the two")
        self.critic = critic
        self.model_name_or_path = model_name_or_path
        self.from_pretrained_kwargs = dict(from_pretrained_kwargs or {})
        if dtype is not None:
            self.from_pretrained_kwargs["dtype"] = _as_dtype(dtype)
        self.share_prefix_forward = share_prefix_forward
        if min_shared_prefix is not None and min_shared_prefix < 1:
            raise ValueError(f"min_shared_prefix must be a positive number of tokens or None (off), got {min_shared_prefix}")
        self.min_shared_prefix = min_shared_prefix
        self.lora_config = None if lora_config is None else lora_config_dict(lora_config)
        self.kv_cache = kv_cache
        self.gradient_checkpointing = gradient_checkpointing
        self.forbid_special_tokens = forbid_special_tokens
        self.forbidden_token_ids = None if forbidden_token_ids is None else [int(i) for i in forbidden_token_ids]
        self.value_learning_rate = value_learning_rate
        self._grouping_checked = False  # see _warn_if_ungrouped
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            ortho_init=False,
            features_extractor_class=CausalLMExtractor,
            features_extractor_kwargs=dict(model_name_or_path=model_name_or_path,
                                           from_pretrained_kwargs=self.from_pretrained_kwargs),
            share_features_extractor=True,
            **kwargs,
        )

    @property
    def lm(self):
        """The wrapped Hugging Face causal LM (``PreTrainedModel``); its output head is ``action_net``."""
        return self.features_extractor.lm

    def _build(self, lr_schedule: Schedule) -> None:
        self._check_model()
        # Not a registered submodule: its parameters are self.lm's, already in the state dict.
        vars(self)["peft_model"] = (None if self.lora_config is None
                                    else add_lora(self.lm, self.lora_config, self.model_name_or_path))
        self.register_buffer("logit_mask", self._logit_mask(), persistent=False)
        if self.gradient_checkpointing:
            checkpoint_layers(self.lm)
        self.rollout_cache = RolloutKVCache(self.lm)
        if self.kv_cache:
            self.rollout_cache.check()
        self._build_mlp_extractor()
        self.action_net = self.lm.get_output_embeddings()
        if self.critic:
            self.value_net = th.nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
            th.nn.init.zeros_(self.value_net.weight)
            th.nn.init.zeros_(self.value_net.bias)
        else:
            self.value_net = NoCritic()
        value_params = [*self.value_net.parameters(), *self.mlp_extractor.value_net.parameters()]
        value_ids = {id(p) for p in value_params}
        shared = self.value_learning_rate is None or not value_params
        params = [p for p in self.parameters() if shared or id(p) not in value_ids]
        # With LoRA the LM's own weights are frozen: leave them out of the optimizer.
        self.master_weights = MasterWeights(p for p in params if p.requires_grad)
        self.optimizer = self.optimizer_class(self.master_weights.masters, lr=lr_schedule(1), **self.optimizer_kwargs)
        if self.master_weights.low_precision:
            self.master_weights.attach(self.optimizer)
            self.register_load_state_dict_post_hook(self._sync_master_weights)
        if not shared:
            self.value_optimizer = self.optimizer_class(value_params, lr=self.value_learning_rate, **self.optimizer_kwargs)
            self.optimizer.register_step_post_hook(self._step_value_optimizer)
            # SB3 saves and loads self.optimizer's state dict only: the value optimizer's rides along in it.
            self.optimizer.register_state_dict_post_hook(self._add_value_optimizer_state)
            self.optimizer.register_load_state_dict_pre_hook(self._load_value_optimizer_state)

    def _step_value_optimizer(self, optimizer, args, kwargs) -> None:
        # SB3 zeroes, clips and steps only self.optimizer; the value head's gradients were clipped
        # with the rest (clip_grad_norm_ over policy.parameters()), so step them here, then zero them.
        self.value_optimizer.step()
        self.value_optimizer.zero_grad()

    @th.no_grad()
    def _sync_master_weights(self, module, incompatible_keys) -> None:
        # load_state_dict (SB3's PPO.load / set_parameters) writes the low-precision weights, not
        # their float32 masters, whose stale values the next optimizer step would copy back over the
        # loaded weights: restart the masters from the loaded weights.
        for param, master in self.master_weights.pairs:
            if param is not master:
                master.copy_(param.float())

    def _add_value_optimizer_state(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[VALUE_OPTIMIZER_KEY] = self.value_optimizer.state_dict()
        return state_dict

    def _load_value_optimizer_state(self, optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        # torch hands the hook a shallow copy: popping the key leaves the caller's dict alone, and
        # torch's own loader never sees a key it does not know.
        value_state = state_dict.pop(VALUE_OPTIMIZER_KEY, None)
        if value_state is None:
            warnings.warn(OLD_OPTIMIZER_STATE_WARNING, UserWarning, stacklevel=3)
        else:
            self.value_optimizer.load_state_dict(value_state)
        return state_dict

    def _check_model(self) -> None:
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        if vocab != self.action_space.n:
            raise ValueError(
                f"{self.model_name_or_path} predicts {vocab} tokens but the action space is "
                f"Discrete({self.action_space.n}); create the env with the same model "
                f"(model_name_or_path=...) or with vocab_size={vocab}"
            )
        window = self.observation_space["input_ids"].shape[-1]
        positions = getattr(self.lm.config.get_text_config(), "max_position_embeddings", None)
        if positions is not None and window > positions:
            raise ValueError(f"observations hold {window} tokens but {self.model_name_or_path} has only "
                             f"{positions} positions; lower max_prompt_tokens + max_new_tokens")
        self._check_logits(vocab)

    def _check_logits(self, vocab: int) -> None:
        # The action logits are the output head applied to the trunk's last hidden state. Models
        # that transform logits after their head (Gemma-2's final_logit_softcapping, Cohere's
        # logit_scale, Granite's logits_scaling) would silently not be the pretrained policy.
        ids = (th.arange(3, device=self.device) % vocab)[None]
        obs = {"input_ids": ids, "attention_mask": th.ones_like(ids)}
        with th.no_grad():
            expected = self.lm(**obs).logits[0, -1].float()
            got = output_logits(self.lm, self.features_extractor(obs))[0]
        gap = float((got - expected).abs().max())
        if gap > 1e-3 * max(1.0, float(expected.abs().max())):
            config = self.lm.config.get_text_config()
            suspects = {k: getattr(config, k) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling")
                        if getattr(config, k, None) not in (None, 1, 1.0)}
            raise ValueError(
                f"{self.model_name_or_path} ({type(self.lm).__name__}) changes its logits after the output head "
                f"(the head on the last hidden state differs from its own forward by up to {gap:.3g}"
                f"{'; config: ' + str(suspects) if suspects else ''}), so the policy would not be the pretrained "
                "model; this architecture is not supported yet")

    def _logit_mask(self) -> th.Tensor | None:
        """Bool ``(vocab,)``: True for token ids the policy never samples (see the class doc)."""
        from textgym.chat import special_token_ids, stop_token_ids
        from textgym.env import load_tokenizer

        vocab = self.action_space.n
        tokenizer = load_tokenizer(getattr(self.observation_space, "model_name_or_path", None) or self.model_name_or_path)
        masked = set(range(len(tokenizer), vocab))
        if self.forbid_special_tokens:
            stops = stop_token_ids(tokenizer, -1, chat_template=bool(getattr(tokenizer, "chat_template", None)))
            masked |= special_token_ids(tokenizer) - stops
        for i in self.forbidden_token_ids or ():
            if not 0 <= i < vocab:
                raise ValueError(f"forbidden_token_ids holds {i}, not a token id in [0, {vocab})")
            masked.add(i)
        if not masked:
            return None
        if len(masked) == vocab:
            raise ValueError("every token id is forbidden; allow at least one")
        mask = th.zeros(vocab, dtype=th.bool)
        mask[sorted(masked)] = True
        return mask

    def _get_action_dist_from_latent(self, latent_pi: th.Tensor):
        """SB3's categorical distribution over the action logits, with :attr:`logit_mask` applied."""
        # action_net is the LM's own output head (see _build).
        return self.action_dist.proba_distribution(action_logits=output_logits(self.lm, latent_pi, self.logit_mask))

    def set_training_mode(self, mode: bool) -> None:
        """SB3's train/eval switch; the LM stays in eval mode either way (dropout off, see class doc)."""
        super().set_training_mode(mode)
        self.lm.eval()
        self.rollout_cache.clear()

    def keep_rollout_rows(self, rows: th.Tensor) -> None:
        """Keep only ``rows`` of the rollout KV cache, in that order: the next no-grad ``forward``
        gets the observations of those envs only (:meth:`agents.policy.kv_cache.RolloutKVCache.keep_rows`).

        :param rows: ``(K,)`` int64 indices into the last ``forward``'s batch.
        """
        self.rollout_cache.keep_rows(rows)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Sample actions with their values and log-probs, as SB3's ``collect_rollouts`` calls it.

        Without grad and in eval mode (a rollout) with ``kv_cache``, features come from the
        rollout KV cache; otherwise from a full forward (SB3's ``ActorCriticPolicy.forward``).

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param deterministic: take the most likely token instead of sampling.
        :return: ``actions`` int64 ``(B,)``, ``values`` float32 ``(B, 1)``, ``log_prob`` float32 ``(B,)``.
        """
        if not (self.kv_cache and not self.training and not th.is_grad_enabled()):
            return super().forward(obs, deterministic)
        features = self.rollout_cache.features(obs["input_ids"], obs["attention_mask"])
        latent_pi, latent_vf = self.mlp_extractor(features)
        distribution = self._get_action_dist_from_latent(latent_pi)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions.reshape((-1, *self.action_space.shape)), self.value_net(latent_vf), distribution.log_prob(actions)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, th.nn.Parameter]]:
        """The trainable parameters only (``torch.nn.Module.named_parameters`` filtered on
        ``requires_grad``; ``parameters()`` follows).

        Frozen weights (a LoRA policy's base LM) are constants of the policy, not parameters an
        algorithm may differentiate: sb3-contrib's ``TRPO`` takes ``torch.autograd.grad`` with
        respect to every named parameter, which fails on a tensor that does not require grad. They
        stay in ``state_dict()`` and move with ``.to(device)`` as before.
        """
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            if param.requires_grad:
                yield name, param

    def _features(self, obs: PyTorchObs) -> th.Tensor:
        """Last-token features of a batch: one forward per episode with ``share_prefix_forward``."""
        if self.share_prefix_forward:
            return last_token_features(self.lm, obs["input_ids"], obs["attention_mask"], self.shared_prefix_tokens)
        return self.extract_features(obs)

    @property
    def shared_prefix_tokens(self) -> int | None:
        """The ``min_shared_prefix`` in force: ``None`` unless ``kv_cache`` (whose construction check
        proved the LM's KV cache usable) is on too."""
        return self.min_shared_prefix if self.kv_cache else None

    def get_distribution(self, obs: PyTorchObs):
        """The action distribution for a batch (SB3's ``get_distribution``; ``predict`` and
        sb3-contrib's ``TRPO`` call it), one forward per episode with ``share_prefix_forward``.

        With grad enabled the forward runs on PyTorch's math attention kernel
        (``torch.nn.attention.SDPBackend.MATH``): TRPO's Hessian-vector products differentiate the
        KL twice, and the fused CPU/GPU attention kernels have no second derivative
        (``derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
        implemented``). PPO and A2C never get here with grad (they use :meth:`evaluate_actions`).

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :return: SB3's ``CategoricalDistribution`` over ``(B, vocab)`` float32 logits.
        """
        with _twice_differentiable_attention() if th.is_grad_enabled() else contextlib.nullcontext():
            features = self._features(obs)
        return self._get_action_dist_from_latent(self.mlp_extractor.forward_actor(features))

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """Value estimates ``float32 (B, 1)``, one forward per episode with ``share_prefix_forward``
        (TRPO's critic updates and SB3's bootstrap of truncated episodes call it)."""
        return self.value_net(self.mlp_extractor.forward_critic(self._features(obs)))

    def extract_features(self, obs: PyTorchObs, features_extractor=None) -> th.Tensor:
        """Features from integer observations, skipping SB3's float cast (``preprocess_obs``)."""
        return (features_extractor or self.features_extractor)(obs)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        """Values, log-probs and entropy of ``actions`` for a minibatch, as SB3's PPO/A2C expect.

        With ``share_prefix_forward`` each group of observations that are prefixes of one another
        costs one transformer forward (:func:`agents.policy.prefix_sharing.last_token_features`); results equal
        the per-observation computation up to float rounding.

        :param obs: ``{"input_ids": (B, L), "attention_mask": (B, L)}`` tensors.
        :param actions: ``(B,)`` token ids (any dtype holding integers).
        :return: ``values`` float32 ``(B, 1)``, ``log_prob`` float32 ``(B,)``, ``entropy`` float32 ``(B,)``.
        """
        checkpointing = (activation_checkpointing(checkpoint_layers(self.lm)) if self.gradient_checkpointing
                         else contextlib.nullcontext())
        if not self.share_prefix_forward:
            with checkpointing:
                return super().evaluate_actions(obs, actions)
        if not self._grouping_checked:
            self._grouping_checked = True
            self._warn_if_ungrouped(obs["input_ids"], obs["attention_mask"])
        with checkpointing:
            features = self._features(obs)
        latent_pi, latent_vf = self.mlp_extractor(features)
        distribution = self._get_action_dist_from_latent(latent_pi)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def _warn_if_ungrouped(self, input_ids: th.Tensor, attention_mask: th.Tensor) -> None:
        # Checked on the first minibatch only: the user learns before the slow epochs run, and
        # later updates pay nothing for it. An episode-grouped minibatch holds, for each covering
        # row with g generated tokens, its g + 1 prefixes (0..g generated); shuffled single
        # transitions hold few of them.
        prompt_length = getattr(self.observation_space, "prompt_length", None)
        rows = len(input_ids)
        if prompt_length is None or rows < 16:
            return
        reps = th.unique(covering_rows(input_ids.long(), attention_mask.long()))
        generated = attention_mask[reps, prompt_length:].long().sum(-1)
        expected = int((generated + 1).sum())
        # Both conditions: in a dialogue the context tokens the game appended count in ``generated``
        # but are not steps, so ``expected`` alone overstates a grouped minibatch.
        if rows < expected / 2 and rows < 2 * len(reps):
            warnings.warn(UNGROUPED_WARNING.format(rows=rows, groups=len(reps), expected=expected),
                          UserWarning, stacklevel=3)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        for key in ("features_extractor_class", "features_extractor_kwargs", "ortho_init"):
            data.pop(key, None)
        data.update(model_name_or_path=self.model_name_or_path,
                    from_pretrained_kwargs=self.from_pretrained_kwargs,
                    share_prefix_forward=self.share_prefix_forward,
                    min_shared_prefix=self.min_shared_prefix,
                    lora_config=self.lora_config,
                    kv_cache=self.kv_cache,
                    gradient_checkpointing=self.gradient_checkpointing,
                    forbid_special_tokens=self.forbid_special_tokens,
                    forbidden_token_ids=self.forbidden_token_ids,
                    value_learning_rate=self.value_learning_rate,
                    critic=self.critic)
        return data


class NoCritic(th.nn.Module):
    """The value head of a policy without a critic: ``V(s) = 0``, no parameters.

    :param latent: ``float32 (B, d)`` value features (ignored but for their batch size and device).
    :return: ``float32 (B, 1)`` zeros, without grad.
    """

    def forward(self, latent: th.Tensor) -> th.Tensor:
        return latent.new_zeros(latent.shape[0], 1).detach()


def _twice_differentiable_attention():
    """Context in which ``scaled_dot_product_attention`` uses its math kernel (differentiable twice)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _as_dtype(dtype: th.dtype | str) -> th.dtype:
    """``torch.bfloat16`` from ``torch.bfloat16``, ``"bfloat16"`` or ``"torch.bfloat16"``.

    :raises ValueError: not a floating-point torch dtype.
    """
    value = getattr(th, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, th.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype (torch.bfloat16, torch.float16, "
                         f"torch.float32), got {dtype!r}")
    return value


def _check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    if not (isinstance(observation_space, spaces.Dict)
            and {"input_ids", "attention_mask"} <= set(observation_space.spaces)):
        raise ValueError(f"TransformerPolicy needs a Dict observation space with 'input_ids' and "
                         f"'attention_mask' (textgym's TokenWindowSpace), got {observation_space}")
    if not isinstance(action_space, spaces.Discrete):
        raise ValueError(f"TransformerPolicy needs a Discrete action space (token ids), got {action_space}")
