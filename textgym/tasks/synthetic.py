"""Synthetic text tasks with programmatic rewards and a known optimum, on a tiny word-level LM.

A run on a real reward model that does not improve could mean a broken setup or a hard task;
these tasks tell the two apart. Each one has a reward in ``[0, 1]`` whose optimum (1.0) is known
and reachable, a documented chance level (the expected reward of a uniformly random policy), and
recommended PPO settings with which a tiny random GPT-2 (:func:`tiny_lm_path`) gets to the optimum
in about 10 s of one CPU core. If PPO does not get far above chance on these, the setup is broken.

==========================  =========================================  ======  =====  ===========
Gymnasium id                what earns reward                          chance  tiny   train steps
==========================  =========================================  ======  =====  ===========
``TextGen-Keyword-v0``      ``"good"`` in all 4 slots                  0.0860  0.084  6,000
``TextGen-Copy-v0``         the 2 prompt words, in order               0.0950  0.102  8,000
``TextGen-Reverse-v0``      the 2 prompt words, reversed               0.0950  0.117  12,000
``TextGen-Increasing-v0``   4 strictly increasing number words         0.1565  0.152  10,000
==========================  =========================================  ======  =====  ===========

*chance*: the exact expected reward of the uniform random policy over the whole action space
(10 token ids: ``<pad>`` and ``<unk>``, which decode to nothing, ``<eos>``, which ends the episode,
and the 7 words of :data:`SYNTHETIC_WORDS`), computed by enumerating every token sequence with its
probability; :func:`uniform_policy_reward` reproduces it by Monte-Carlo through the real
environment (20,000 episodes: within 0.002 of every value). *tiny*: the mean reward of the
untrained tiny LM, which is close to uniform (sampling, 400 episodes, averaged over PPO seeds 0-5).
*train steps*: ``total_timesteps`` after which seeds 0-5 scored 0.95-1.0 (see :data:`TASKS`).

Because ``<pad>`` and ``<unk>`` decode to nothing, a policy can spend a step without writing a
word; the rewards are defined on the decoded text, so no task can require the EOS token itself.

Call :func:`register_synthetic_tasks` once to register the ids; then ``gym.make(id, **overrides)``
accepts any :class:`textgym.env.TextGenEnv` keyword argument. :data:`TASKS` lists the tasks with
their optimum, chance level and training settings.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from textgym import assets

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six")
"""Number words, in increasing order of value (1..6): the material of the copy and increasing tasks."""

KEYWORD = "good"
"""The word the keyword task asks for."""

SYNTHETIC_WORDS = (KEYWORD, *NUMBER_WORDS)
"""Vocabulary of the synthetic tasks' tiny LM after ``<pad> <unk> <eos>`` (ids 3..9).

Small on purpose: a uniformly random policy then hits a given word with probability 1/10, so
exploration finds rewarded completions quickly, and every word any task needs is in it.
"""

TINY_LM_CONFIG = MappingProxyType(dict(n_layer=2, n_embd=32, n_head=2, n_positions=64, seed=0))
"""Arguments of :func:`textgym.tiny.save_tiny_lm` for the synthetic tasks' LM (besides ``words``)."""

RewardFn = Callable[[list[str], list[str]], list[float]]


def tiny_lm_path() -> Path:
    """Directory of the synthetic tasks' tiny GPT-2 and word-level tokenizer, written once.

    The model is :func:`textgym.tiny.save_tiny_lm` with ``words=SYNTHETIC_WORDS`` and
    :data:`TINY_LM_CONFIG` (random weights, 27,840 parameters, vocabulary 10). It is cached under
    ``textgym.assets.cache_dir() / "synthetic"`` in a directory named after a hash of the
    vocabulary and config, so a change of either writes a new model instead of reusing a stale one.
    Concurrent first calls are safe: each builds in a private directory and the first to finish
    publishes it. The global torch RNG is left as it was.

    :return: the directory (``config.json``, ``model.safetensors``, tokenizer files).
    :raises OSError: the cache directory is not writable.
    """
    key = hashlib.sha256(repr((SYNTHETIC_WORDS, sorted(TINY_LM_CONFIG.items()))).encode()).hexdigest()[:12]
    root = assets.cache_dir() / "synthetic"
    final = root / f"tiny-gpt2-{key}"
    if (final / "model.safetensors").is_file() and (final / "tokenizer.json").is_file():
        return final
    import torch

    from textgym.tiny import save_tiny_lm

    root.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(dir=root, prefix=".build-"))
    # save_tiny_lm seeds the global torch RNG; creating an env must not change what a user's
    # seeded code draws afterwards.
    try:
        with torch.random.fork_rng(devices=[]):
            save_tiny_lm(build, words=SYNTHETIC_WORDS, **TINY_LM_CONFIG)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return assets.publish_dir(build, final)


def word_sequence_prompts(words: Sequence[str], length: int, n: int | None = None, seed: int = 0) -> list[str]:
    """Prompts made of ``length`` words from ``words``, joined by single spaces.

    :param words: the words to draw from (no whitespace inside a word).
    :param length: words per prompt.
    :param n: ``None``: every sequence, ``len(words) ** length`` prompts in ``itertools.product``
        order; else ``n`` sequences drawn uniformly with replacement by
        ``numpy.random.default_rng(seed)`` (the same list on every call).
    :param seed: seed of the generator when ``n`` is given.
    :return: ``list[str]``.
    :raises ValueError: ``words`` is empty, or ``length`` or ``n`` is not positive.
    """
    if not words or length < 1 or (n is not None and n < 1):
        raise ValueError(f"need at least one word and positive length and n, got {len(words)} words, "
                         f"length={length}, n={n}")
    if n is None:
        return [" ".join(seq) for seq in itertools.product(words, repeat=length)]
    indices = np.random.default_rng(seed).integers(len(words), size=(n, length))
    return [" ".join(words[i] for i in row) for row in indices]


@dataclass(frozen=True)
class KeywordReward:
    """Fraction of the ``slots`` generation slots filled with ``keyword``.

    ``score = min(1, completion.split().count(keyword) / slots)``. Stopping early (EOS) leaves
    slots empty, so it costs. Optimum 1.0: the keyword in every slot (``"good good good good"``
    for 4 slots). The task of this repository's own learning test (``tests/test_learning.py``).

    Chance (``TextGen-Keyword-v0``, 4 slots, 10 token ids): exactly
    ``(1/40) * (1 + 0.9 + 0.9**2 + 0.9**3) = 0.0860``: at each step the keyword has probability
    1/10, and step t is reached only if none of the t - 1 earlier tokens was EOS (0.9 each).

    :param slots: the env's ``max_new_tokens``.
    :param keyword: the rewarded word.
    """

    slots: int = 4
    keyword: str = KEYWORD

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score in ``[0, 1]`` per completion; ``prompts`` are ignored."""
        return [min(1.0, c.split().count(self.keyword) / self.slots) for c in completions]


@dataclass(frozen=True)
class CopyReward:
    """Reproduce the prompt's words in order (``reverse=True``: in reverse order).

    ``score = (positions i where completion word i == target word i) / max(len(target),
    len(completion words))``: the fraction of the prompt's positions got right; extra words count
    against it, so echoing more than the prompt never pays. With ``max_new_tokens`` equal to the
    prompt length (as registered) the denominator is the prompt length. Optimum 1.0: the prompt
    itself (``"two five"`` for prompt ``"two five"``; reversed: ``"five two"``). Its optimum
    depends on the prompt, so it fails when the policy does not see the prompt (a broken attention
    mask or observation layout): the best prompt-blind policy scores 1/6 on the registered tasks.

    Chance (``TextGen-Copy-v0`` and ``TextGen-Reverse-v0``: 2-word prompts over 6 number words,
    2 slots, 10 token ids): 0.0950, by exact enumeration (see the module doc); it is the same for
    both, because uniformly random words match any fixed target equally often.

    Source: the Copy / Reverse tasks of Zaremba, Mikolov, Joulin & Fergus (2016), "Learning
    Simple Algorithms from Examples" (arXiv:1511.07275), once OpenAI Gym's ``Copy-v0`` and
    ``Reverse-v0`` algorithmic environments.

    :param reverse: target the prompt's words reversed.
    """

    reverse: bool = False

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score in ``[0, 1]`` per (prompt, completion) pair.

        :raises ValueError: ``prompts`` and ``completions`` differ in length.
        """
        scores = []
        for prompt, completion in zip(prompts, completions, strict=True):
            target, words = prompt.split(), completion.split()
            if self.reverse:
                target.reverse()
            right = sum(a == b for a, b in zip(words, target))
            scores.append(right / max(len(target), len(words), 1))
        return scores


@dataclass(frozen=True)
class IncreasingReward:
    """A strictly increasing sequence of number words (``numbers`` lists them by increasing value).

    ``score = (consecutive pairs among the first `slots` words that are both number words and
    increase) / (slots - 1)``. Stopping early leaves pairs missing. Optimum 1.0: ``slots``
    strictly increasing numbers, e.g. ``"one two three four"`` or ``"two three five six"``; many
    completions are optimal, unlike the keyword task, and the right next word depends on the
    previous one.

    Chance (``TextGen-Increasing-v0``, 4 slots, 6 number words among 10 token ids): 0.1565, by
    exact enumeration (see the module doc).

    :param slots: the env's ``max_new_tokens`` (at least 2).
    :param numbers: the number words, smallest first.
    :raises ValueError: ``slots < 2``.
    """

    slots: int = 4
    numbers: tuple[str, ...] = NUMBER_WORDS

    def __post_init__(self):
        if self.slots < 2:
            raise ValueError(f"IncreasingReward needs slots >= 2 (one pair at least), got {self.slots}")

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        """One score in ``[0, 1]`` per completion; ``prompts`` are ignored."""
        value = {word: i for i, word in enumerate(self.numbers)}
        scores = []
        for completion in completions:
            words = completion.split()[:self.slots]
            pairs = sum(a in value and b in value and value[b] > value[a] for a, b in zip(words, words[1:]))
            scores.append(pairs / (self.slots - 1))
        return scores


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: its env settings, known optimum, chance level and training recipe.

    :param name: short name, the key in :data:`TASKS`.
    :param gym_id: the Gymnasium id :func:`register_synthetic_tasks` registers.
    :param optimum: the highest reachable mean reward (1.0 for all tasks here).
    :param chance: expected reward of the uniformly random policy (see the module doc).
    :param ppo_kwargs: overrides for :func:`agents.text_ppo_kwargs` (read-only mapping):
        ``PPO(TransformerPolicy, env, **text_ppo_kwargs(**task.ppo_kwargs))``.
    :param total_timesteps: training steps with ``ppo_kwargs`` after which PPO seeds 0-5 scored
        0.95-1.0 (about 6-11 s on one CPU core).
    :param make_reward: ``max_new_tokens -> reward callable``, so the optimum stays 1.0 when a
        user overrides ``max_new_tokens``.
    :param prompts: the task's prompts (tuple of str).
    :param max_prompt_tokens: the env's prompt window (every prompt word is one token).
    :param max_new_tokens: the env's generation limit.
    """

    name: str
    gym_id: str
    optimum: float
    chance: float
    ppo_kwargs: Mapping[str, Any] = field(hash=False)
    total_timesteps: int
    make_reward: Callable[[int], RewardFn] = field(repr=False)
    prompts: tuple[str, ...] = field(repr=False)
    max_prompt_tokens: int
    max_new_tokens: int

    def __post_init__(self):
        # Frozen guards the attributes; a read-only mapping also guards the shared kwargs' contents.
        object.__setattr__(self, "ppo_kwargs", MappingProxyType(dict(self.ppo_kwargs)))

    def env_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """Keyword arguments of :class:`textgym.env.TextGenEnv` for this task, ``overrides`` applied.

        The tiny LM is written (once) only when ``model_name_or_path`` is not overridden; the reward
        follows an overridden ``max_new_tokens`` unless ``reward_model`` is overridden too.
        """
        max_new_tokens = overrides.get("max_new_tokens", self.max_new_tokens)
        kwargs = dict(prompts=list(self.prompts), max_prompt_tokens=self.max_prompt_tokens,
                      max_new_tokens=max_new_tokens)
        kwargs.update(overrides)
        if "reward_model" not in kwargs:
            kwargs["reward_model"] = self.make_reward(max_new_tokens)
        if "model_name_or_path" not in kwargs:
            kwargs["model_name_or_path"] = str(tiny_lm_path())
        return kwargs


# Chosen from runs on the tiny LM (seeds 0-2): learning_rate 3e-3 got near the optimum sooner
# but then fell back on some seeds. normalize_advantage=False matters once the policy is near
# the optimum: nearly every episode then scores the same, the advantages are value-estimate
# noise, and normalising them to unit scale turned that noise into full-size policy updates that
# undid what was learned (with it, increasing fell from 0.94 to 0.78 between 6k and 12k steps).
_PPO_KWARGS = dict(learning_rate=1e-3, n_steps=32, batch_size=32, n_epochs=4, normalize_advantage=False)

_FILLER_PROMPTS = tuple(word_sequence_prompts(SYNTHETIC_WORDS, 3, n=64, seed=0))

TASKS: Mapping[str, SyntheticTask] = MappingProxyType({
    "keyword": SyntheticTask(
        name="keyword", gym_id="TextGen-Keyword-v0", optimum=1.0,
        chance=0.0860,
        ppo_kwargs=_PPO_KWARGS, total_timesteps=6_000, make_reward=KeywordReward,
        prompts=_FILLER_PROMPTS, max_prompt_tokens=3, max_new_tokens=4),
    "copy": SyntheticTask(
        name="copy", gym_id="TextGen-Copy-v0", optimum=1.0,
        chance=0.0950,
        ppo_kwargs=_PPO_KWARGS, total_timesteps=8_000, make_reward=lambda n: CopyReward(),
        prompts=tuple(word_sequence_prompts(NUMBER_WORDS, 2)), max_prompt_tokens=2, max_new_tokens=2),
    "reverse": SyntheticTask(
        name="reverse", gym_id="TextGen-Reverse-v0", optimum=1.0,
        chance=0.0950,
        ppo_kwargs=_PPO_KWARGS, total_timesteps=12_000, make_reward=lambda n: CopyReward(reverse=True),
        prompts=tuple(word_sequence_prompts(NUMBER_WORDS, 2)), max_prompt_tokens=2, max_new_tokens=2),
    "increasing": SyntheticTask(
        name="increasing", gym_id="TextGen-Increasing-v0", optimum=1.0,
        chance=0.1565,
        ppo_kwargs=_PPO_KWARGS, total_timesteps=10_000, make_reward=IncreasingReward,
        prompts=_FILLER_PROMPTS, max_prompt_tokens=3, max_new_tokens=4),
})
"""The synthetic tasks by name (read-only). Chance levels: see the module doc and each reward class."""


def make_synthetic_env(task: str, **overrides: Any):
    """Gymnasium entry point of the synthetic tasks: a :class:`textgym.env.TextGenEnv` for ``task``.

    :param task: a key of :data:`TASKS`.
    :param overrides: any ``TextGenEnv`` keyword argument, replacing the task's (see
        :meth:`SyntheticTask.env_kwargs`).
    :return: the environment.
    :raises ValueError: unknown task, or a ``TextGenEnv`` argument check failed.
    """
    from textgym.env import TextGenEnv

    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    return TextGenEnv(**TASKS[task].env_kwargs(**overrides))


def register_synthetic_tasks() -> list[str]:
    """Register every task of :data:`TASKS` with Gymnasium under its ``gym_id``; idempotent.

    Ids already in ``gymnasium.registry`` are left alone (so calling it twice, or after a user
    registered the same id, does not warn or overwrite). Registration is lazy: no model is
    written until an env is made.

    :return: the ids registered by this call (empty when all were there already).
    """
    import gymnasium as gym

    added = []
    for spec in TASKS.values():
        if spec.gym_id in gym.registry:
            continue
        gym.register(id=spec.gym_id, entry_point="textgym.tasks.synthetic:make_synthetic_env",
                     kwargs={"task": spec.name})
        added.append(spec.gym_id)
    return added


def uniform_policy_reward(task: str, n_episodes: int = 20_000, seed: int = 0) -> float:
    """Monte-Carlo estimate of the chance level: mean reward of uniformly random token ids.

    Runs the real environment (:func:`make_synthetic_env`), so decoding details (special tokens
    that decode to nothing, EOS ending the episode) count exactly as in training. Standard error
    is at most ``0.5 / sqrt(n_episodes)`` (0.0035 for 20,000 episodes, under a second per task).

    :param task: a key of :data:`TASKS`.
    :param n_episodes: episodes to average.
    :param seed: seeds the env's prompt draws and the action sampler.
    :return: the mean reward (float).
    :raises ValueError: unknown task or ``n_episodes < 1``.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be positive, got {n_episodes}")
    env = make_synthetic_env(task)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    total = 0.0
    for _ in range(n_episodes):
        env.reset()
        terminated = False
        while not terminated:
            _, reward, terminated, _, _ = env.step(int(rng.integers(env.action_space.n)))
        total += reward
    return total / n_episodes
