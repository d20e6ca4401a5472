"""rl-baselines3-zoo (``rl_zoo3==2.9.2``) support: the pieces its yaml files can name, a tuning sampler
for text, and a replay that prints the completions.

The zoo builds the model from a yaml file of hyperparameters (textgym ships one:
:func:`textgym.hyperparams.yaml_path`). Three things a text run needs do not fit the zoo as it is,
and this module supplies them as class paths the yaml can name:

- ``rollout_buffer_class``: the zoo converts strings to Python objects only for ``policy``,
  ``policy_kwargs``, ``replay_buffer_class``/``_kwargs``, wrappers and callbacks
  (``rl_zoo3/exp_manager.py``, ``_preprocess_hyperparams``), so ``rollout_buffer_class:
  agents.EpisodeRolloutBuffer`` would reach PPO as a string and fail. The callback
  :class:`EpisodeRolloutBufferCallback` (``callback: agents.zoo.EpisodeRolloutBufferCallback``)
  installs :class:`agents.EpisodeRolloutBuffer` before the first rollout instead, and records it as
  the model's ``rollout_buffer_class`` so that saved models keep it.
- an adaptive KL penalty: the yaml passes callback arguments as literals, so
  :class:`AdaptiveKLPenaltyCallback` takes the controller's numbers instead of a controller object.
- tuning: the zoo's PPO sampler suggests ``net_arch`` (actor layers) and ``activation_fn``, which
  :class:`agents.TransformerPolicy` rejects (its actor is the LM's own head).
  :func:`install_text_sampler` puts :func:`sample_text_ppo_params` in the zoo's sampler table for
  ``ppo``; it falls back to the zoo's own sampler for studies whose policy is not a
  ``TransformerPolicy``. Importing this module changes nothing in the zoo: :mod:`agents.zoo`, the
  zoo's entry point, calls :func:`install_text_sampler` when the zoo imports it (through the yaml's
  callback paths ``agents.zoo.*``, or ``--gym-packages textgym agents.zoo``), so ``-optimize`` with
  textgym's yaml uses the text sampler without anything more on the command line.

``python -m agents.zoo --env TextGen-Keyword-v0 -f logs`` replays a model the zoo trained and prints
prompts, completions and rewards as a table, sampling by default (the zoo's own ``rl_zoo3.enjoy``
works too: it asks for ``render_mode="human"``, in which the text envs print each finished episode,
but it takes the most likely token and counts ``-n`` in steps); see :func:`main`.
"""

from __future__ import annotations

import argparse
import ast
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from agents.algorithms.buffers import EpisodeRolloutBuffer
from agents.algorithms.kl import KL_HORIZON, AdaptiveKLController, KLPenaltyCallback

ZOO_ALGO = "ppo"
"""The zoo's algorithm key whose sampler and converter :func:`install_text_sampler` replaces."""

TEXT_PPO_SEARCH_SPACE: dict[str, Any] = dict(
    learning_rate=(1e-6, 3e-3),          # log-uniform: SmolLM2 fine-tunes at ~1e-5, the tiny synthetic LM at 1e-3
    value_learning_rate=(1e-5, 1e-2),    # log-uniform: the fresh value head (policy_kwargs of TransformerPolicy)
    n_steps=(16, 32, 64, 128),           # steps per env per rollout
    batch_size=(16, 32, 64, 128, 256),   # minimum transitions per minibatch, capped at n_steps * n_envs
    n_epochs=(1, 2, 4, 8),
    ent_coef=(1e-8, 1e-2),               # log-uniform
    clip_range=(0.1, 0.2, 0.3),
)
"""What :func:`sample_text_ppo_params` searches: ``(low, high)`` log-uniform ranges and tuples of choices.

Everything else (``gamma=1``, ``gae_lambda``, ``vf_coef``, ``target_kl``, ``normalize_advantage``,
the callbacks) comes from the yaml entry unchanged.
"""


class EpisodeRolloutBufferCallback(BaseCallback):
    """Give the model an :class:`agents.EpisodeRolloutBuffer` before its first rollout (SB3 callback).

    For configurations that cannot pass classes to PPO, such as rl-baselines3-zoo's yaml files (the
    zoo leaves a ``rollout_buffer_class`` string unconverted, see the module doc). At the start of
    ``learn`` (``_init_callback``, which SB3 runs before the first rollout) a model whose buffer is
    not already a ``buffer_class`` gets a new one, built with the same arguments SB3's
    ``OnPolicyAlgorithm._setup_model`` uses, and ``model.rollout_buffer_class`` is set too, so
    ``model.save`` records it and ``PPO.load`` rebuilds the same buffer. Put it first in the list of
    callbacks, before any callback that keeps a reference to the buffer. A model that has the buffer
    already is left alone, so passing ``rollout_buffer_class`` to PPO as well is harmless.

    Source: textgym (issue 12); SB3's buffer construction in ``OnPolicyAlgorithm._setup_model``.

    :param buffer_class: the rollout buffer class (a subclass of SB3's ``RolloutBuffer`` or
        ``DictRolloutBuffer``) or its import path, e.g. ``"agents.EpisodeRolloutBuffer"``.
    :param verbose: 1 prints a line when the buffer is replaced.
    :raises TypeError: (at training start) the model is not an on-policy algorithm (no ``rollout_buffer``).
    """

    def __init__(self, buffer_class: type | str = EpisodeRolloutBuffer, verbose: int = 0):
        super().__init__(verbose)
        if isinstance(buffer_class, str):
            from rl_zoo3.utils import get_class_by_name

            buffer_class = get_class_by_name(buffer_class)
        self.buffer_class = buffer_class

    def _init_callback(self) -> None:
        model = self.model
        if not hasattr(model, "rollout_buffer"):
            raise TypeError(f"{type(model).__name__} has no rollout buffer; EpisodeRolloutBufferCallback "
                            "is for on-policy algorithms (PPO, A2C)")
        if isinstance(model.rollout_buffer, self.buffer_class):
            return
        model.rollout_buffer_class = self.buffer_class
        model.rollout_buffer = self.buffer_class(
            model.n_steps,
            model.observation_space,
            model.action_space,
            device=model.device,
            gamma=model.gamma,
            gae_lambda=model.gae_lambda,
            n_envs=model.n_envs,
            **model.rollout_buffer_kwargs,
        )
        if self.verbose >= 1:
            print(f"rollout buffer: {self.buffer_class.__name__}")

    def _on_step(self) -> bool:
        return True


class AdaptiveKLPenaltyCallback(KLPenaltyCallback):
    """:class:`agents.KLPenaltyCallback` with an :class:`agents.AdaptiveKLController`, built from numbers.

    The same as ``KLPenaltyCallback(AdaptiveKLController(init_kl_coef, target, horizon),
    reference_model)``, for configurations that pass callback arguments as literals (a zoo yaml:
    ``callback: [{agents.zoo.AdaptiveKLPenaltyCallback: {init_kl_coef: 0.05, target: 4.0}}]``).
    The defaults are those of ``examples/train_sentiment.py``.

    Source: textgym (issue 12); the controller is Ziegler et al. (2019), Sec. 2.2.

    :param init_kl_coef: starting ``beta``, > 0.
    :param target: target KL per episode, nats, > 0.
    :param horizon: episodes over which ``beta`` may change by about ``e^0.2``, > 0.
    :param reference_model: hub id or path of the reference LM; ``None``: the policy's model.
    :param verbose: SB3 verbosity.
    :raises ValueError: a non-positive ``init_kl_coef``, ``target`` or ``horizon``.
    """

    def __init__(self, init_kl_coef: float = 0.05, target: float = 4.0, horizon: float = KL_HORIZON,
                 reference_model: str | None = None, verbose: int = 0):
        super().__init__(AdaptiveKLController(init_kl_coef, target=target, horizon=horizon),
                         reference_model=reference_model, verbose=verbose)


def _study_defaults(trial) -> dict[str, str]:
    """The study's user attributes (the zoo stores every default hyperparameter there as ``str``)."""
    try:
        return dict(trial.study.user_attrs)
    except AttributeError:  # a FixedTrial or a bare trial object without a study
        return {}


def _literal_dict(text: str | None) -> dict[str, Any]:
    """``ast.literal_eval(text)`` if that gives a dict, else ``{}``."""
    try:
        value = ast.literal_eval(text) if text else {}
    except (ValueError, SyntaxError):
        return {}
    return value if isinstance(value, dict) else {}


def sample_text_ppo_params(trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """rl-baselines3-zoo sampler for PPO with :class:`agents.TransformerPolicy`.

    Has the signature of the zoo's ``HYPERPARAMS_SAMPLER`` entries
    (``rl_zoo3.hyperparams_opt.sample_ppo_params``) and samples :data:`TEXT_PPO_SEARCH_SPACE`:
    ``learning_rate``, ``n_steps``, ``batch_size``, ``n_epochs``, ``ent_coef``, ``clip_range`` and the
    policy's ``value_learning_rate``. Unlike the zoo's PPO sampler it suggests no ``net_arch`` or
    ``activation_fn``, and names every parameter as PPO does, so a trial's ``params`` are the
    hyperparameters themselves (but ``value_learning_rate``, which goes into ``policy_kwargs``).
    ``batch_size`` is capped at ``n_steps * n_envs`` (the value used is recorded as the trial's user
    attribute ``batch_size``; ``params`` keep the drawn one). The cap changes nothing but SB3's
    "truncated mini-batch" warning: :class:`agents.EpisodeRolloutBuffer` packs episodes until a
    minibatch holds ``batch_size`` transitions, so any larger value gives one minibatch of the whole
    rollout, as the cap does; a trial loaded with ``--trial-id`` (uncapped) warns and trains the same.

    The zoo replaces the yaml's ``policy_kwargs`` by the sampled one as a whole, so the sampled
    ``policy_kwargs`` starts from the yaml's: the zoo records the defaults as strings in the study's
    user attributes, and those that are Python literals (``{'value_learning_rate': 0.0001}``) are
    kept; other entries (classes, ``lora_config`` objects) are lost during tuning.

    Source: textgym (issue 12), after ``rl_zoo3.hyperparams_opt.sample_ppo_params`` (2.9.2).

    :param trial: an ``optuna.Trial``.
    :param n_actions: unused (action noise of off-policy algorithms).
    :param n_envs: parallel envs of the run (the yaml's ``n_envs``).
    :param additional_args: unused (HER settings).
    :return: keyword arguments for ``stable_baselines3.PPO`` (with ``policy_kwargs``).
    """
    space = TEXT_PPO_SEARCH_SPACE
    learning_rate = trial.suggest_float("learning_rate", *space["learning_rate"], log=True)
    value_learning_rate = trial.suggest_float("value_learning_rate", *space["value_learning_rate"], log=True)
    n_steps = trial.suggest_categorical("n_steps", list(space["n_steps"]))
    batch_size = trial.suggest_categorical("batch_size", list(space["batch_size"]))
    n_epochs = trial.suggest_categorical("n_epochs", list(space["n_epochs"]))
    ent_coef = trial.suggest_float("ent_coef", *space["ent_coef"], log=True)
    clip_range = trial.suggest_categorical("clip_range", list(space["clip_range"]))
    batch_size = min(batch_size, n_steps * max(n_envs, 1))
    trial.set_user_attr("batch_size", batch_size)
    params = dict(learning_rate=learning_rate, value_learning_rate=value_learning_rate, n_steps=n_steps,
                  batch_size=batch_size, n_epochs=n_epochs, ent_coef=ent_coef, clip_range=clip_range)
    base_policy_kwargs = _literal_dict(_study_defaults(trial).get("policy_kwargs"))
    return convert_text_ppo_params(params, base_policy_kwargs=base_policy_kwargs)


def convert_text_ppo_params(params: dict[str, Any], base_policy_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A trial's ``params`` (from :func:`sample_text_ppo_params`) as PPO keyword arguments.

    Has the signature of the zoo's ``HYPERPARAMS_CONVERTER`` entries, which the zoo calls when
    ``--trial-id`` loads a trial's hyperparameters from a study. ``value_learning_rate`` moves into
    ``policy_kwargs``; the rest is passed on unchanged.

    Source: textgym (issue 12), after ``rl_zoo3.hyperparams_opt.convert_onpolicy_params``.

    :param params: the sampled parameters, by name.
    :param base_policy_kwargs: ``policy_kwargs`` to start from; ``None``: none (the zoo then uses
        only ``value_learning_rate``, replacing the yaml's ``policy_kwargs``).
    :return: a new dict.
    """
    hyperparams = dict(params)
    policy_kwargs = dict(base_policy_kwargs or {})
    if "value_learning_rate" in hyperparams:
        policy_kwargs["value_learning_rate"] = hyperparams.pop("value_learning_rate")
    if policy_kwargs:
        hyperparams["policy_kwargs"] = policy_kwargs
    return hyperparams


_ZOO_ORIGINALS: dict[str, Callable] = {}
"""The zoo's own PPO sampler and converter, kept by :func:`install_text_sampler` for studies it does not handle."""


def _sampler(trial, n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    if "TransformerPolicy" in _study_defaults(trial).get("policy", "TransformerPolicy"):
        return sample_text_ppo_params(trial, n_actions, n_envs, additional_args)
    return _ZOO_ORIGINALS["sampler"](trial, n_actions, n_envs, additional_args)


def _converter(params: dict[str, Any]) -> dict[str, Any]:
    if "net_arch" in params or "one_minus_gamma" in params:  # sampled by the zoo's own sampler
        return _ZOO_ORIGINALS["converter"](params)
    return convert_text_ppo_params(params)


def install_text_sampler() -> None:
    """Make rl-baselines3-zoo tune PPO with :func:`sample_text_ppo_params` (in this process); idempotent.

    Replaces ``rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER["ppo"]`` and
    ``HYPERPARAMS_CONVERTER["ppo"]`` (the dicts the zoo's ``ExperimentManager`` looks up for every
    trial; it has no other hook for a custom sampler) with dispatchers: a study whose recorded
    ``policy`` (the zoo stores it as a user attribute) is a ``TransformerPolicy`` gets the text
    sampler, any other the zoo's own ``sample_ppo_params``; a trial's params with the zoo's
    ``net_arch`` / ``one_minus_gamma`` keys go to the zoo's converter. Importing :mod:`agents.zoo`
    (what textgym's yaml and ``--gym-packages textgym agents.zoo`` do) calls it; a script that runs
    the zoo's tuning in-process calls it itself.

    Source: textgym (issue 12).

    :raises ImportError: rl_zoo3 is not installed.
    """
    from rl_zoo3 import hyperparams_opt

    if hyperparams_opt.HYPERPARAMS_SAMPLER[ZOO_ALGO] is _sampler:
        return
    _ZOO_ORIGINALS["sampler"] = hyperparams_opt.HYPERPARAMS_SAMPLER[ZOO_ALGO]
    _ZOO_ORIGINALS["converter"] = hyperparams_opt.HYPERPARAMS_CONVERTER[ZOO_ALGO]
    hyperparams_opt.HYPERPARAMS_SAMPLER[ZOO_ALGO] = _sampler
    hyperparams_opt.HYPERPARAMS_CONVERTER[ZOO_ALGO] = _converter


def zoo_hyperparams(env_id: str, algo: str = ZOO_ALGO) -> dict[str, Any]:
    """The zoo's own tuned hyperparameters for ``env_id``, from the yaml shipped inside ``rl_zoo3``
    (``rl_zoo3/hyperparams/<algo>.yml``, the file its benchmark was trained with).

    Schedules written ``lin_<value>`` become SB3's ``LinearSchedule(value, 0.0, 1.0)`` (the zoo's
    ``linear_schedule``: ``value * progress_remaining``); every other entry is returned as the
    yaml has it, the zoo's own keys (``n_envs``, ``n_timesteps``, ``policy``, ``normalize``)
    included, so the caller decides which go to the algorithm.

    :raises KeyError: the zoo has no entry for ``env_id`` (the message lists the ones it has).
    """
    from importlib import resources

    import yaml
    from stable_baselines3.common.utils import LinearSchedule

    entries = yaml.safe_load(resources.files("rl_zoo3").joinpath("hyperparams", f"{algo}.yml").read_text())
    if env_id not in entries:
        raise KeyError(f"rl_zoo3 has no {algo} hyperparameters for {env_id!r}; it has {sorted(entries)}")
    entry = dict(entries[env_id])
    for key, value in entry.items():
        if isinstance(value, str) and value.startswith("lin_"):
            entry[key] = LinearSchedule(start=float(value.removeprefix("lin_")), end=0.0, end_fraction=1.0)
    return entry


def load_zoo_model(folder: str, env_id: str, algo: str = ZOO_ALGO, exp_id: int = 0, load_best: bool = False,
                   load_checkpoint: str | None = None, load_last_checkpoint: bool = False, device: str = "auto"):
    """Load a model that ``python -m rl_zoo3.train`` saved, found as ``rl_zoo3.enjoy`` finds it.

    Source: textgym (issue 12); the lookup is ``rl_zoo3.utils.get_model_path`` and
    ``get_saved_hyperparams``, as in ``rl_zoo3/enjoy.py``.

    :param folder: the zoo's log folder (``-f`` of ``rl_zoo3.train``).
    :param env_id: the Gymnasium id it was trained on.
    :param algo: the zoo's algorithm key.
    :param exp_id: run number (``{folder}/{algo}/{env_id}_{exp_id}``); 0: the latest.
    :param load_best: load ``best_model.zip`` (written by the zoo's evaluation callback).
    :param load_checkpoint: load ``rl_model_{load_checkpoint}_steps.zip``.
    :param load_last_checkpoint: load the checkpoint with the most steps.
    :param device: torch device of the loaded model.
    :return: ``(model, env_kwargs, model_path)``: ``env_kwargs`` are those the run trained with
        (the yaml's ``env_kwargs``, overridden by ``--env-kwargs``).
    :raises ValueError: no such model (the zoo's message).
    :raises AssertionError: no such run folder (the zoo's check).
    """
    import yaml
    from huggingface_sb3 import EnvironmentName
    from rl_zoo3.utils import ALGOS, get_model_path, get_saved_hyperparams

    env_name = EnvironmentName(env_id)
    _, model_path, log_path = get_model_path(exp_id, folder, algo, env_name, load_best, load_checkpoint,
                                             load_last_checkpoint)
    hyperparams, _ = get_saved_hyperparams(os.path.join(log_path, env_name), test_mode=True)
    env_kwargs = dict(hyperparams.get("env_kwargs") or {})
    args_path = os.path.join(log_path, env_name, "args.yml")
    if os.path.isfile(args_path):
        with open(args_path) as f:
            train_args = yaml.load(f, Loader=yaml.UnsafeLoader)  # written by the zoo itself, as enjoy reads it
        if train_args.get("env_kwargs") is not None:
            env_kwargs = dict(train_args["env_kwargs"])
    model = ALGOS[algo].load(model_path, device=device)
    return model, env_kwargs, model_path


def sample_completions(model, env_id: str, n_episodes: int = 8, env_kwargs: dict[str, Any] | None = None,
                       deterministic: bool = False, seed: int = 0) -> list[dict[str, Any]]:
    """Run ``model`` for ``n_episodes`` episodes of ``env_id`` and return each final step's info.

    Source: textgym (issue 12).

    :param model: an SB3 model (``predict``) trained on a textgym env.
    :param env_id: a registered textgym id (``TextGen-Keyword-v0``, ...).
    :param n_episodes: episodes to run, >= 1.
    :param env_kwargs: ``gym.make`` overrides.
    :param deterministic: take the most likely token at every step instead of sampling.
    :param seed: seeds the env's prompt draws and the sampling (``model.set_random_seed``, which
        seeds Python's, NumPy's and torch's global generators).
    :return: one dict per episode: ``prompt``, ``completion``, ``reward`` (the episode's return)
        and ``reward_components`` (the env's final-step info).
    :raises ValueError: ``n_episodes < 1``.
    """
    import gymnasium as gym

    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    env = gym.make(env_id, **(env_kwargs or {}))
    model.set_random_seed(seed)
    episodes = []
    try:
        obs, _ = env.reset(seed=seed)
        for _ in range(n_episodes):
            done, total = False, 0.0
            while not done:
                action, _ = model.predict(obs, deterministic=deterministic)
                obs, reward, terminated, truncated, info = env.step(int(np.asarray(action).item()))
                total += float(reward)
                done = terminated or truncated
            episodes.append(dict(prompt=info.get("prompt", ""), completion=info.get("completion", ""),
                                 reward=total, reward_components=info.get("reward_components", {"score": total})))
            obs, _ = env.reset()
    finally:
        env.close()
    return episodes


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``python -m agents.zoo``: replay a zoo-trained text model and print its completions and rewards.

    The table counterpart of ``python -m rl_zoo3.enjoy`` (which prints each finished episode's
    text through ``render_mode="human"``, greedy). Finds the model as enjoy does (``-f``, ``--algo``, ``--exp-id``, ``--load-best``,
    ``--load-checkpoint``, ``--load-last-checkpoint``), runs ``-n`` *episodes* (enjoy's ``-n`` counts
    steps), prints a table of prompt, completion and reward components
    (:func:`agents.training.callbacks.samples_table`) and the mean reward. Samples by default;
    ``--deterministic`` takes the most likely token.

    Source: textgym (issue 12).

    :param argv: command-line arguments; ``None``: ``sys.argv[1:]``.
    :return: the episodes (see :func:`sample_completions`).
    :raises ValueError, AssertionError: no model found (the zoo's lookup).
    """
    import importlib

    from agents.training.callbacks import samples_table

    parser = argparse.ArgumentParser(prog="python -m agents.zoo", description=main.__doc__.splitlines()[0])
    parser.add_argument("--env", required=True, help="Gymnasium id the model was trained on")
    parser.add_argument("-f", "--folder", default="logs", help="the zoo's log folder (-f of rl_zoo3.train)")
    parser.add_argument("--algo", default=ZOO_ALGO)
    parser.add_argument("--exp-id", type=int, default=0, help="run number; 0: the latest")
    parser.add_argument("-n", "--n-episodes", type=int, default=8, help="episodes to run (not steps)")
    parser.add_argument("--load-best", action="store_true", help="load best_model.zip")
    parser.add_argument("--load-checkpoint", default=None, help="load rl_model_<N>_steps.zip")
    parser.add_argument("--load-last-checkpoint", action="store_true")
    parser.add_argument("--deterministic", action="store_true", help="most likely token instead of sampling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--gym-packages", nargs="+", default=["textgym"],
                        help="modules to import so the id is registered (default: textgym)")
    args = parser.parse_args(argv)
    for module in args.gym_packages:
        importlib.import_module(module)

    model, env_kwargs, model_path = load_zoo_model(args.folder, args.env, args.algo, args.exp_id, args.load_best,
                                                   args.load_checkpoint, args.load_last_checkpoint, args.device)
    print(f"Loaded {model_path}" + (f" (env_kwargs={env_kwargs})" if env_kwargs else ""))
    episodes = sample_completions(model, args.env, args.n_episodes, env_kwargs, args.deterministic, args.seed)
    print(samples_table(episodes))
    rewards = [e["reward"] for e in episodes]
    print(f"{len(rewards)} episodes, mean reward {np.mean(rewards):.3f} +/- {np.std(rewards):.3f} "
          f"({'most likely token' if args.deterministic else 'sampled'})")
    return episodes

