"""Per-token KL penalty to a frozen reference model (Ziegler et al. 2019; Stiennon et al. 2020).

The reward of step ``t`` becomes ``r_t - beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))``: the
reward model's score still arrives on the last token, and every token pays for moving away from the
reference model. ``log pi`` is the behaviour log-prob SB3 already stored during the rollout; the
reference log-probs take one reference forward per episode. The penalty is applied by
:class:`KLPenaltyCallback` after the rollout and before PPO's update, by rewriting the rollout
buffer's rewards and recomputing GAE with SB3's own ``compute_returns_and_advantage``.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from agents.distributed import collectives
from agents.policy.extractor import load_causal_lm
from agents.policy.lora import adapters_disabled
from agents.policy.precision import output_logits
from agents.policy.prefix_sharing import last_token_features


class FixedKLController:
    """A constant KL coefficient.

    :param kl_coef: ``beta`` (reward units per nat), >= 0.
    :raises ValueError: negative ``kl_coef``.
    """

    def __init__(self, kl_coef: float = 0.05):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, kl: float, n_episodes: int) -> None:
        """No-op (kept for the controller interface)."""


KL_HORIZON = 64
"""Default horizon of :class:`AdaptiveKLController`, in episodes (see there for why so short)."""


class AdaptiveKLController:
    """Ziegler et al. 2019 (Sec. 2.2): steer ``beta`` so that the KL per episode approaches a target.

    ``e = clip(KL / target - 1, -0.2, 0.2)`` and ``beta <- beta * (1 + e * n_episodes / horizon)``,
    where ``KL`` is the mean KL (nats) per episode of the last rollout and ``n_episodes`` the
    number of complete episodes it held. Episodes are the unit of the original: Ziegler et al.'s
    ``lm-human-preferences`` and TRL's ``AdaptiveKLController`` advance it by the batch size,
    which counts queries (one generation each), not tokens.

    Their horizon, 10,000 episodes, suits runs of hundreds of thousands of episodes. The main job
    here (``examples/train_sentiment.py``) is 384 episodes of 16 tokens, 16 per rollout, where that
    horizon lets ``beta`` move by at most 0.8 % over the whole run. The default :data:`KL_HORIZON`
    (64 episodes) lets it move by up to 5 % per rollout at that scale (about x3.3 over the run),
    enough to hold the target (measured in docs/results.md); scale it with the run's length.

    :param init_kl_coef: starting ``beta``, > 0.
    :param target: target KL per episode, nats, > 0.
    :param horizon: episodes over which ``beta`` may change by about a factor ``e^0.2``, > 0.
    :raises ValueError: a non-positive argument.
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float = 2.0, horizon: float = KL_HORIZON):
        for name, value in (("init_kl_coef", init_kl_coef), ("target", target), ("horizon", horizon)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, kl: float, n_episodes: int) -> None:
        """Move ``beta`` toward the target after a rollout of ``n_episodes`` complete episodes
        with mean KL ``kl`` (nats per episode)."""
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_episodes / self.horizon


REFERENCE_CHUNK = 512
"""Rows per reference forward: bounds its logits to ``512 x vocab`` floats (100 MB for SmolLM2)."""


def reference_log_probs(reference, input_ids: th.Tensor, attention_mask: th.Tensor, actions: th.Tensor,
                        chunk_size: int = REFERENCE_CHUNK, logit_mask: th.Tensor | None = None,
                        min_shared_prefix: int | None = None) -> th.Tensor:
    """``log pi_ref(a|s)`` for a batch of token-window observations, one forward per episode.

    Rows are scored ``chunk_size`` at a time, so memory stays bounded however long the rollout
    (SB3's ``n_steps=2048`` with 8 envs is 16,384 rows: 3.2 GB of float32 logits at once for
    SmolLM2's 49,152-token vocabulary). Within a chunk, rows that extend one another share one
    forward (:func:`agents.policy.prefix_sharing.last_token_features`); keep an episode's rows next to
    each other (env-major order) so that few episodes straddle two chunks, each straddling one
    costing one more forward.

    :param reference: a transformers causal LM.
    :param input_ids: ``(B, L)`` integer observations (:class:`textgym.spaces.TokenWindowSpace`).
    :param attention_mask: ``(B, L)`` 0/1.
    :param actions: ``(B,)`` token ids.
    :param chunk_size: rows per forward, >= 1.
    :param logit_mask: bool ``(vocab,)``, token ids excluded from the softmax (a policy's
        :attr:`agents.TransformerPolicy.logit_mask`); ``None``: the LM's full distribution.
    :param min_shared_prefix: run the tokens all of a chunk's episodes begin with once, from this many
        (:func:`agents.policy.prefix_sharing.last_token_features`); ``None``: never.
    :return: ``float32 (B,)`` log-probabilities (natural log).
    """
    out = []
    with th.no_grad():
        for lo in range(0, len(actions), chunk_size):
            rows = slice(lo, lo + chunk_size)
            features = last_token_features(reference, input_ids[rows], attention_mask[rows], min_shared_prefix)
            logits = output_logits(reference, features, logit_mask)
            chosen = logits.gather(-1, actions[rows].long().view(-1, 1)).squeeze(-1)
            out.append(chosen - th.logsumexp(logits, dim=-1))
    return th.cat(out) if out else th.zeros(0)


def complete_episode_sums(values: np.ndarray, episode_starts: np.ndarray, last_dones: np.ndarray) -> np.ndarray:
    """Sum ``values`` over each episode that lies wholly inside one rollout.

    :param values: ``(n_steps, n_envs)`` per-step quantities (e.g. per-token KL).
    :param episode_starts: ``(n_steps, n_envs)`` 1.0 where a step starts an episode (SB3's buffer field).
    :param last_dones: ``(n_envs,)`` whether the last stored step ended its episode.
    :return: ``float64 (n_episodes,)``, one sum per complete episode, env by env.
    """
    ends = np.zeros(values.shape, dtype=bool)
    ends[:-1] = episode_starts[1:] > 0
    ends[-1] = np.asarray(last_dones, dtype=bool)
    sums = []
    for env in range(values.shape[1]):
        start = None
        for t in range(values.shape[0]):
            if episode_starts[t, env] > 0:
                start = t
            if ends[t, env] and start is not None:
                sums.append(float(values[start:t + 1, env].sum()))
                start = None
    return np.asarray(sums, dtype=np.float64)


class KLPenaltyCallback(BaseCallback):
    """Add the per-token KL penalty to each rollout before PPO's update (SB3 callback).

    Use with :class:`agents.TransformerPolicy`: ``model.learn(..., callback=KLPenaltyCallback(0.05))``.
    The reference model is loaded fresh from ``reference_model`` (default: the policy's
    ``model_name_or_path``), frozen and kept in eval mode, so it is the pretrained starting point
    however often ``learn`` is called. A policy with LoRA adapters (``lora_config``) and no
    ``reference_model`` needs no second model: the reference is the policy's own LM with its
    adapters disabled (:func:`agents.policy.lora.adapters_disabled`), whose weights LoRA never changes;
    ``self.reference`` then stays ``None``. After each rollout it logs:

    - ``kl/episode_kl``: mean over complete episodes of ``sum_t (log pi - log pi_ref)``, nats;
    - ``kl/coef``: ``beta`` used for this rollout;
    - ``kl/score``: mean reward-model score of complete episodes (the env's reward, before penalty);
    - ``kl/penalised_return``: mean of ``score - beta * episode KL`` over complete episodes.

    The controller is updated with ``kl/episode_kl`` after the penalty is applied. The last
    rollout's figures stay in ``self.stats`` (``dict[str, float]``, the same keys).

    Resuming: the controller is stored on the model as ``model.kl_controller``, so ``model.save``
    keeps it (an adaptive ``beta`` is training state) and ``PPO.load`` brings it back. At the start
    of ``learn`` the callback *adopts the model's controller* when ``learn`` continues the model's
    timestep count (``reset_num_timesteps=False`` on a model that has trained) and
    ``resume_controller`` is true; the controller passed here is then only a fallback for models
    that carry none, and a ``UserWarning`` says so if its type or settings differ from the adopted
    one. Otherwise (a new count: ``learn``'s default ``reset_num_timesteps=True``, or
    ``resume_controller=False``) the controller passed here is used and replaces the model's. So
    ``PPO.load`` then ``learn(..., callback=KLPenaltyCallback(same arguments),
    reset_num_timesteps=False)`` continues ``beta`` where it was (see :mod:`agents.training.resume`).

    :param kl_coef: a float (fixed ``beta``), or a controller with ``.value`` and
        ``.update(kl, n_episodes)`` (:class:`FixedKLController`, :class:`AdaptiveKLController`).
    :param reference_model: hub id or path of the reference LM; ``None``: the policy's model.
    :param verbose: SB3 verbosity.
    :param resume_controller: adopt the model's saved controller when ``learn`` continues the
        timestep count (see above); ``False``: always use ``kl_coef``.
    :raises TypeError: (at training start) the policy has no ``model_name_or_path`` and no
        ``reference_model`` was given.
    """

    MODEL_ATTRIBUTE = "kl_controller"
    """The model attribute that holds the controller (pickled by SB3's ``save`` with the model)."""

    def __init__(self, kl_coef: Any = 0.05, reference_model: str | None = None, verbose: int = 0,
                 resume_controller: bool = True):
        super().__init__(verbose)
        self.controller = FixedKLController(kl_coef) if isinstance(kl_coef, (int, float)) else kl_coef
        self.reference_model = reference_model
        self.resume_controller = resume_controller
        self.reference = None
        self.stats: dict[str, float] = {}

    def _init_callback(self) -> None:
        self._adopt_saved_controller()
        if self.reference is not None or self._uses_disabled_adapters():
            return
        name = self.reference_model or getattr(self.model.policy, "model_name_or_path", None)
        if name is None:
            raise TypeError("KLPenaltyCallback needs reference_model=... or a TransformerPolicy")
        kwargs = getattr(self.model.policy, "from_pretrained_kwargs", {})
        # from_pretrained draws from torch's global generator when it initialises weights the
        # checkpoint lacks; a resumed run loads its reference at another point of that stream than
        # the run it continues, so loading must leave the stream as it found it.
        with th.random.fork_rng(devices=[]):
            self.reference = load_causal_lm(name, **kwargs).requires_grad_(False).to(self.model.device)

    def _adopt_saved_controller(self) -> None:
        # _setup_learn zeroes num_timesteps before callbacks start unless learn continues the count.
        saved = getattr(self.model, self.MODEL_ATTRIBUTE, None)
        if self.resume_controller and saved is not None and self.model.num_timesteps > 0:
            passed, adopted = self._settings(self.controller), self._settings(saved)
            if saved is not self.controller and passed != adopted:
                warnings.warn(f"KLPenaltyCallback continues the model's saved KL controller {adopted} "
                              f"(beta={saved.value:.6g}), not the one passed ({passed}); "
                              "pass resume_controller=False to use yours", UserWarning, stacklevel=2)
            self.controller = saved
        setattr(self.model, self.MODEL_ATTRIBUTE, self.controller)

    @staticmethod
    def _settings(controller: Any) -> str:
        """A controller's type and attributes other than its current ``value``, as text (for comparison)."""
        fields = {key: value for key, value in sorted(getattr(controller, "__dict__", {}).items()) if key != "value"}
        return f"{type(controller).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    def _uses_disabled_adapters(self) -> bool:
        return self.reference_model is None and getattr(self.model.policy, "peft_model", None) is not None

    def _reference_log_probs(self, input_ids: th.Tensor, attention_mask: th.Tensor, actions: th.Tensor) -> th.Tensor:
        # The policy's own architecture passed its KV-cache check; another reference model may not have.
        shared = getattr(self.model.policy, "shared_prefix_tokens", None) if self.reference_model is None else None
        if self.reference is not None:
            return reference_log_probs(self.reference, input_ids, attention_mask, actions, min_shared_prefix=shared)
        with adapters_disabled(self.model.policy) as base:
            return reference_log_probs(base, input_ids, attention_mask, actions, min_shared_prefix=shared)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        n_steps, n_envs = buffer.rewards.shape
        # Env-major rows keep each episode's steps together, so the chunked reference pass splits few.
        obs = {key: th.as_tensor(value.swapaxes(0, 1).reshape(n_envs * n_steps, -1), device=self.model.device)
               for key, value in buffer.observations.items()}
        actions = th.as_tensor(buffer.actions.swapaxes(0, 1).reshape(-1), device=self.model.device)
        ref = self._reference_log_probs(obs["input_ids"], obs["attention_mask"], actions)
        kl = buffer.log_probs - ref.cpu().numpy().reshape(n_envs, n_steps).T
        beta = self.controller.value
        scores = buffer.rewards.copy()
        buffer.rewards -= (beta * kl).astype(np.float32)
        dones = self.locals["dones"]  # collect_rollouts' last dones and values, as it passed them to GAE
        buffer.compute_returns_and_advantage(last_values=self.locals["values"], dones=dones)

        episode_kl = complete_episode_sums(kl, buffer.episode_starts, dones)
        episode_score = complete_episode_sums(scores, buffer.episode_starts, dones)
        self.stats = {"kl/coef": beta}
        # Over every rank's episodes in a data-parallel run, so that all ranks keep the same beta.
        kl_sum, score_sum, n_episodes = collectives.all_reduce_sum([episode_kl.sum(), episode_score.sum(), len(episode_kl)])
        if n_episodes:
            self.stats.update({
                "kl/episode_kl": float(kl_sum / n_episodes),
                "kl/score": float(score_sum / n_episodes),
                "kl/penalised_return": float((score_sum - beta * kl_sum) / n_episodes),
            })
            self.controller.update(self.stats["kl/episode_kl"], int(n_episodes))
        for key, value in self.stats.items():
            self.logger.record(key, value)
