"""reasoning-gym tasks as TextGen environments: chat prompts, answers checked by the task's own verifier.

`reasoning-gym <https://github.com/open-thought/reasoning-gym>`_ (pinned in ``pyproject.toml``)
generates questions procedurally, offline, for about a hundred tasks (arithmetic, counting,
puzzles, ...) and scores an answer with each dataset's ``score_answer`` (0..1). This module turns
one of them into a :class:`textgym.env.TextGenEnv` in chat mode: every question is rendered
through the model's chat template after a system line that asks for ``<answer>...</answer>``, and
the reward is the dataset's score of the answer :func:`textgym.rewards.verifiable.extract_answer`
reads from the reply, plus an optional bonus for the format. This is RL with verifiable rewards
(Shao et al. 2024, "DeepSeekMath"; Lambert et al. 2024, "Tülu 3") on the token-level env.

``gym.make("TextGen-Reasoning-v0", task="chain_sum", task_config={"min_terms": 2, ...})``; see
:func:`make_reasoning_env` for every argument.

Splits: the held-out split (``split="test"``) is ``test_size`` questions generated with
``test_seed``; the training split is ``train_size`` questions generated with ``train_seed`` *minus
every question that also occurs in the held-out split*, so the two are disjoint by question text
(checked). reasoning-gym derives entry ``i`` of a dataset from ``seed + i``, so the default seeds
are far apart, and tasks with few distinct questions still lose their held-out ones from training.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from textgym import assets
from textgym.rewards.verifiable import VerifiableReward

DEFAULT_SYSTEM_PROMPT = "Answer with the final answer only, inside <answer></answer>."
"""System line of the reasoning envs: asks for the answer inside the tags the reward reads."""

TRAIN_SEED, TEST_SEED = 0, 1_000_000
"""Default generator seeds of the two splits (far apart: entry ``i`` comes from ``seed + i``)."""

TRAIN_SIZE, TEST_SIZE = 5_000, 500
"""Default number of generated questions per split (before removing held-out ones from training)."""


def create_dataset(task: str, size: int, seed: int, config: Mapping[str, Any] | None = None):
    """``reasoning_gym.create_dataset`` with errors that say what to fix.

    :param task: a reasoning-gym dataset name (``reasoning_gym.factory.DATASETS``).
    :param size: number of entries.
    :param seed: generator seed.
    :param config: the dataset's config fields (e.g. ``{"min_terms": 2}``).
    :return: a ``reasoning_gym`` ``ProceduralDataset`` (indexable; entries are dicts with
        ``question``, ``answer``, ``metadata``).
    :raises ValueError: unknown task (the message lists every task), or a config the dataset
        rejects (the message gives reasoning-gym's error and the config's fields).
    """
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    if task not in DATASETS:
        raise ValueError(f"unknown reasoning-gym task {task!r}; tasks: {', '.join(sorted(DATASETS))}")
    try:
        return reasoning_gym.create_dataset(task, size=size, seed=seed, **dict(config or {}))
    except (TypeError, ValueError, AssertionError) as err:
        _, config_cls = DATASETS[task]
        fields = sorted(getattr(config_cls, "__dataclass_fields__", {}))
        raise ValueError(f"reasoning-gym rejected task_config={dict(config or {})!r} for {task!r}: "
                         f"{type(err).__name__}: {err}. Its config fields: {fields}") from err


@dataclass(frozen=True)
class ReasoningSplits:
    """The training and held-out questions of one task, disjoint by question text.

    :param dataset: the held-out dataset object (its ``score_answer`` scores both splits).
    :param train: training entries (``dict`` with ``question``, ``answer``, ``metadata``).
    :param test: held-out entries.
    """

    dataset: Any
    train: tuple[dict, ...]
    test: tuple[dict, ...]

    @functools.cached_property
    def entries_by_question(self) -> dict[str, dict]:
        """Every entry of both splits keyed by its question (the first entry of a repeated question);
        built once per splits object, which every env of a vectorised set shares."""
        table: dict[str, dict] = {}
        for entry in (*self.test, *self.train):
            table.setdefault(entry["question"], entry)
        return table


@functools.lru_cache(maxsize=16)
def _splits(task: str, config_items: tuple, train_size: int, train_seed: int, test_size: int,
            test_seed: int) -> ReasoningSplits:
    config = dict(config_items)
    test_ds = create_dataset(task, test_size, test_seed, config)
    test = tuple(test_ds[i] for i in range(len(test_ds)))
    held_out = {entry["question"] for entry in test}
    train_ds = create_dataset(task, train_size, train_seed, config)
    train = tuple(e for e in (train_ds[i] for i in range(len(train_ds))) if e["question"] not in held_out)
    if not train:
        raise ValueError(f"every one of the {train_size} training questions of {task!r} is also held out; "
                         "the task has too few distinct questions: lower test_size or widen task_config")
    return ReasoningSplits(test_ds, train, test)


def reasoning_splits(task: str, task_config: Mapping[str, Any] | None = None, train_size: int = TRAIN_SIZE,
                     train_seed: int = TRAIN_SEED, test_size: int = TEST_SIZE,
                     test_seed: int = TEST_SEED) -> ReasoningSplits:
    """Generate (once per process) a task's training and held-out questions; see the module doc.

    :raises ValueError: unknown task or bad config (see :func:`create_dataset`), or no training
        question left once the held-out ones are removed.
    """
    items = tuple(sorted((task_config or {}).items()))
    args = (task, items, int(train_size), int(train_seed), int(test_size), int(test_seed))
    try:
        hash(items)
    except TypeError:  # a list in the config: generate without the per-process cache
        return _splits.__wrapped__(*args)
    return _splits(*args)


def make_reasoning_env(
    task: str = "chain_sum",
    task_config: Mapping[str, Any] | None = None,
    split: str = "train",
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
    format_weight: float = 0.0,
    fallback: str | None = "last_number",
    train_size: int = TRAIN_SIZE,
    train_seed: int = TRAIN_SEED,
    test_size: int = TEST_SIZE,
    test_seed: int = TEST_SEED,
    max_new_tokens: int = 32,
    **env_kwargs: Any,
):
    """Gymnasium entry point of ``TextGen-Reasoning-v0``: a chat-mode :class:`TextGenEnv` on a reasoning-gym task.

    Prompts are the split's questions (uniformly drawn, repeats kept), rendered with the model's
    chat template after ``system_prompt``; ``max_prompt_tokens`` defaults to the longest rendered
    question of *both* splits, so the training and held-out envs share one observation space and
    one policy serves both. The reward is a :class:`textgym.rewards.verifiable.VerifiableReward`
    with the dataset's ``score_answer``; ``info["reward_components"]`` holds ``score``, ``correct``
    and ``format``.

    :param task: reasoning-gym dataset name, e.g. ``"chain_sum"``, ``"basic_arithmetic"``, ``"gcd"``.
    :param task_config: the dataset's config fields; ``None``: reasoning-gym's defaults.
    :param split: ``"train"`` or ``"test"`` (held out, disjoint by question).
    :param system_prompt: system line before every question; ``None``: the template's default.
    :param format_weight: reward for a well-formatted reply, added to correctness.
    :param fallback: answer rule for replies without tags (see
        :func:`textgym.rewards.verifiable.extract_answer`).
    :param train_size: training questions generated (held-out ones then removed).
    :param train_seed: seed of the training questions.
    :param test_size: held-out questions.
    :param test_seed: seed of the held-out questions.
    :param max_new_tokens: reply length limit, tokens.
    :param env_kwargs: any other :class:`TextGenEnv` argument (``model_name_or_path``, ...).
    :return: the environment.
    :raises ValueError: unknown split, task or config (the message lists the tasks or the
        config's fields), or a ``TextGenEnv`` check failed.
    """
    from textgym.env import TextGenEnv

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    splits = reasoning_splits(task, task_config, train_size, train_seed, test_size, test_seed)
    questions = [entry["question"] for entry in getattr(splits, split)]
    reward = VerifiableReward(splits.entries_by_question, splits.dataset.score_answer, format_weight, fallback)
    kwargs = dict(prompts=questions, reward_model=reward, chat_template=True, system_prompt=system_prompt,
                  max_new_tokens=max_new_tokens, model_name_or_path=assets.DEFAULT_MODEL)
    kwargs.update(env_kwargs)
    if kwargs.get("max_prompt_tokens") is None:
        all_questions = tuple(dict.fromkeys(e["question"] for e in (*splits.train, *splits.test)))
        kwargs["max_prompt_tokens"] = longest_prompt(kwargs["model_name_or_path"], system_prompt, all_questions)
    return TextGenEnv(**kwargs)


@functools.lru_cache(maxsize=16)
def longest_prompt(model_name_or_path: str, system_prompt: str | None, questions: tuple[str, ...]) -> int:
    """Tokens of the longest question rendered in chat mode (the prompt window both splits share)."""
    from textgym.env import encode_prompts, load_tokenizer

    ids = encode_prompts(load_tokenizer(model_name_or_path), questions, True, system_prompt)
    return max(len(i) for i in ids)
