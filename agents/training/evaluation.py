"""Held-out evaluation of a text policy against its reference model: reward, KL, perplexity, diversity.

This lives in ``agents/`` rather than ``textgym/`` because it needs a policy: it samples through
the policy's own ``predict`` (SB3's ``evaluate_policy``) or its KV-cached rollout path, scores the
samples with the policy's LM and its reference LM (the LoRA-disabled weights or a freshly loaded
pretrained model, as :class:`agents.KLPenaltyCallback` uses), and knows
:class:`agents.TransformerPolicy`'s LoRA switch. ``textgym`` stays the Gymnasium side that knows no policy.

Metrics (all over completed episodes on the env's prompts):

- mean reward ± standard error (the env's episode return, i.e. the reward model's score);
- mean ± standard error of every other reward component the env reports in
  ``info["reward_components"]`` (e.g. ``correct`` = accuracy and ``format`` = format rate of a
  verifiable reward, :mod:`textgym.tasks.reasoning`), one table column each;
- KL to the reference, nats per episode: mean over sampled episodes of
  ``sum_t log pi(a_t|s_t) - log pi_ref(a_t|s_t)``, the Monte-Carlo estimate of
  ``KL(pi || pi_ref)`` per episode whose per-token terms :class:`agents.KLPenaltyCallback` penalises
  (Ziegler et al. 2019); ``pi`` is the distribution the policy samples from (an NLPO policy's
  nucleus mask included);
- perplexity of the completions under the reference: ``exp(-sum log pi_ref(a_t|s_t) / n_tokens)``
  over all generated tokens of all episodes (EOS included when it was sampled);
- distinct-1 / distinct-2 (Li et al. 2016, "A Diversity-Promoting Objective Function for Neural
  Conversation Models"): distinct n-grams / total n-grams over all completions, n-grams of
  *whitespace-separated words* of the decoded completions (``str.split()``, case kept), never across
  completions;
- mean length in tokens (actions per episode, EOS included).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch as th

from agents.algorithms.kl import reference_log_probs
from agents.distributed import collectives
from agents.policy.lora import adapters_disabled
from agents.training.atomic import atomic_write_bytes


@dataclass
class EpisodeSample:
    """One sampled episode.

    :param prompt: the env's prompt.
    :param completion: the decoded completion (``info["completion"]``).
    :param reward: episode return (sum of the env's rewards).
    :param tokens: generated token ids, EOS included when sampled.
    :param log_probs: ``float32 (len(tokens),)`` log-probs of ``tokens`` under the evaluated policy (nats).
    :param ref_log_probs: the same under the reference model.
    :param components: the env's ``info["reward_components"]`` at the episode's end, without ``score``.
    """

    prompt: str
    completion: str
    reward: float
    tokens: list[int]
    log_probs: np.ndarray = field(repr=False)
    ref_log_probs: np.ndarray = field(repr=False)
    components: dict[str, float] = field(default_factory=dict)

    @property
    def kl(self) -> float:
        """``sum_t log pi - log pi_ref`` over this episode's tokens, nats (float64 sum)."""
        return float(np.sum(self.log_probs.astype(np.float64) - self.ref_log_probs.astype(np.float64)))


@dataclass
class TextEvaluation:
    """Held-out metrics of one policy (see the module docstring for definitions).

    :param name: row label (``"reference"`` or ``"trained"``).
    :param n_episodes: episodes evaluated.
    :param reward_mean: mean episode return.
    :param reward_sem: its standard error, ``std(ddof=1) / sqrt(n)`` (0 for one episode).
    :param kl_mean: mean KL to the reference, nats per episode.
    :param kl_sem: its standard error.
    :param perplexity: perplexity of the completions under the reference model.
    :param distinct_1: distinct unigrams / unigrams (whitespace words), ``nan`` without words.
    :param distinct_2: distinct bigrams / bigrams, ``nan`` without bigrams.
    :param length_mean: mean tokens per episode (EOS included).
    :param episodes: every episode, in the order they ended.
    :param components: reward component name -> ``(mean, standard error)`` over episodes, for every
        component besides ``score`` that the env reports (empty for a plain reward model).
    """

    name: str
    n_episodes: int
    reward_mean: float
    reward_sem: float
    kl_mean: float
    kl_sem: float
    perplexity: float
    distinct_1: float
    distinct_2: float
    length_mean: float
    episodes: list[EpisodeSample] = field(repr=False)
    components: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Every metric but the episodes, JSON-serialisable: the fields above as floats (``components``
        as ``{name: [mean, standard error]}``); what a run over seeds keeps of each evaluation."""
        summary = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("episodes", "components")}
        summary = {key: value if isinstance(value, (str, int)) else float(value) for key, value in summary.items()}
        return {**summary, "components": {name: [float(m), float(s)] for name, (m, s) in self.components.items()}}

    def row(self, component_names: Sequence[str] = ()) -> str:
        """This evaluation as one row of :func:`markdown_table`, with columns for ``component_names``."""
        parts = "".join(f" {self.components[n][0]:.3f} ± {self.components[n][1]:.3f} |" if n in self.components
                        else " |" for n in component_names)
        return (f"| {self.name} | {self.reward_mean:+.3f} ± {self.reward_sem:.3f} |{parts} "
                f"{self.kl_mean:.2f} ± {self.kl_sem:.2f} "
                f"| {self.perplexity:.2f} | {self.distinct_1:.3f} | {self.distinct_2:.3f} | {self.length_mean:.1f} |")


def write_summary(path: str, results: dict[str, TextEvaluation], **run: Any) -> None:
    """Write ``results`` (:func:`evaluate_against_reference`'s) as JSON: ``run``'s items (seed, wall
    times, ...: JSON-serialisable) and each evaluation's :meth:`TextEvaluation.summary` under its name.

    The demos' ``--results-json`` (``benchmarks/demo_seeds.py`` collects them over seeds). The file
    is written whole (a temporary file renamed into place), so a reader never sees half of one.

    :raises OSError: the file cannot be written.
    """
    summary = {**run, **{name: evaluation.summary() for name, evaluation in results.items()}}
    atomic_write_bytes(path, (json.dumps(summary, indent=1) + "\n").encode())


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct-n of Li et al. (2016): distinct n-grams / total n-grams over all ``texts``.

    Texts are split into words by whitespace (``str.split()``, case kept); n-grams never span two
    texts; a text with fewer than ``n`` words adds none.

    :param texts: completions.
    :param n: n-gram order, >= 1.
    :return: a float in ``(0, 1]``; ``nan`` when there is no n-gram at all.
    :raises ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(words[i:i + n]) for words in (text.split() for text in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def _sem(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


class CachedSampler:
    """A ``predict`` for SB3's ``evaluate_policy`` that samples through the policy's rollout path.

    ``policy.predict`` runs a full forward over the whole window at every step (SB3's contract: no
    state between calls). This calls ``policy.forward`` without grad in eval mode instead, which
    is what ``collect_rollouts`` calls: with ``kv_cache`` it decodes one new token per env and
    step from the per-env KV cache (:class:`agents.policy.kv_cache.RolloutKVCache`), which checks every
    row and re-encodes rows that started a new episode. Sampling is from the same distribution:
    the log-prob of each sampled action equals the uncached policy's up to float rounding (tested).

    :param policy: a :class:`agents.TransformerPolicy` (its cache is cleared here).
    """

    def __init__(self, policy):
        self.policy = policy
        self.log_probs: list[np.ndarray] = []
        """Log-probs of the sampled actions, one ``float32 (n_envs,)`` array per call."""
        policy.set_training_mode(False)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False):
        """SB3's ``predict`` signature: ``(actions int64 (n_envs,), state)``."""
        obs, _ = self.policy.obs_to_tensor(observation)
        with th.no_grad():
            actions, _, log_probs = self.policy(obs, deterministic=deterministic)
        self.log_probs.append(log_probs.cpu().numpy())
        return actions.cpu().numpy(), state


def _sample_episodes(predictor, env, n_episodes: int, deterministic: bool) -> list[dict[str, Any]]:
    """Run ``n_episodes`` through SB3's ``evaluate_policy``; keep each episode's observations and actions."""
    from stable_baselines3.common.evaluation import evaluate_policy

    running: dict[int, dict[str, Any]] = {}
    finished: list[dict[str, Any]] = []

    def record(local_vars: dict, _globals: dict) -> None:
        i = local_vars["i"]
        episode = running.setdefault(i, {"obs": [], "actions": [], "reward": 0.0})
        episode["obs"].append({key: value[i] for key, value in local_vars["observations"].items()})
        episode["actions"].append(int(local_vars["actions"][i]))
        episode["reward"] += float(local_vars["reward"])
        if local_vars["done"]:
            finished.append(_finish_episode(running.pop(i), local_vars["info"]))

    evaluate_policy(predictor, env, n_eval_episodes=n_episodes, deterministic=deterministic,
                    return_episode_rewards=True, callback=record, warn=False)
    return finished


def _finish_episode(episode: dict[str, Any], info: dict) -> dict[str, Any]:
    """Add the final ``info``'s prompt, completion and reward components to ``episode``."""
    if "completion" not in info:
        raise ValueError("the env's final info has no 'completion'; evaluate on TextGen envs")
    components = {k: float(v) for k, v in info.get("reward_components", {}).items() if k != "score"}
    episode.update(prompt=info["prompt"], completion=info["completion"], components=components)
    return episode


def _wave_envs(env) -> list | None:
    """The Gymnasium envs of ``env`` to step one by one, or ``None`` when only the VecEnv may step them.

    A ``DummyVecEnv``, bare or under wrappers that change neither observations nor rewards
    (:class:`textgym.vec_env.GroupedPrompts` only seeds, :class:`textgym.vec_env.BatchedRewards`
    hands each env the score it would compute itself, ``VecMonitor`` only records).
    """
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, VecMonitor

    from textgym.vec_env import BatchedRewards, GroupedPrompts

    while isinstance(env, VecEnvWrapper):
        if not isinstance(env, (GroupedPrompts, BatchedRewards, VecMonitor)):
            return None
        env = env.venv
    return env.envs if isinstance(env, DummyVecEnv) else None


def _sample_in_waves(policy, env, n_episodes: int, deterministic: bool,
                     shard: tuple[int, int] = (0, 1)) -> list[dict[str, Any]] | None:
    """Sample ``n_episodes`` as batched ``generate`` does: all envs start an episode together, each
    steps until its episode ends, the next wave starts when every env's has ended.

    Why not SB3's ``evaluate_policy``: there an env whose episode ends starts the next at once, so
    prompts are encoded one or two at a time (one batch of 8 costs 0.33 s on SmolLM2, eight of one
    0.62 s), and envs that finished their share keep decoding tokens nobody counts. Here each
    wave's prompts are encoded in one batch by the policy's KV-cached ``forward`` (no grad, eval
    mode), and an env whose episode ended leaves the batch (:meth:`keep_rollout_rows`) until the
    next wave. The episodes are those of ``evaluate_policy``: env ``i`` runs ``(n_episodes + i) //
    n_envs`` episodes on the prompts its own reset draws after ``env.reset()``, and every action is
    sampled from the same policy distribution (only the batch composition differs).

    With ``shard=(rank, world_size)`` only envs ``i`` with ``i % world_size == rank`` are stepped,
    each for the episodes it runs unsharded: the shards of all ranks, whose ``env`` copies are
    built and seeded alike, are together the unsharded episodes.

    :param policy: a :class:`agents.TransformerPolicy` (its rollout cache is used and cleared).
    :param env: a TextGen ``VecEnv``; see :func:`_wave_envs` for those it can step.
    :param shard: ``(rank, world_size)``; ``(0, 1)``: every env.
    :return: episodes as :func:`_sample_episodes` returns them, each with ``"log_probs"`` (float32
        ``(T,)``, the sampled actions' log-probs under the sampling distribution) and ``"key"``
        (``(k, i)``: env ``i``'s ``k``-th episode), sorted by key; ``None`` when ``env`` cannot be
        stepped env by env.
    :raises ValueError: the env's final ``info`` has no ``completion``.
    """
    envs = _wave_envs(env)
    if envs is None:
        return None
    policy.set_training_mode(False)  # also clears the rollout cache
    rank, world_size = shard
    remaining = [(n_episodes + i) // len(envs) if i % world_size == rank else 0 for i in range(len(envs))]
    started = [0] * len(envs)
    first = env.reset()
    current = {i: {key: value[i] for key, value in first.items()} for i in range(len(envs))}
    finished: list[dict[str, Any]] = []
    while any(remaining):
        rows = [i for i in range(len(envs)) if remaining[i]]
        episodes = {i: {"obs": [], "actions": [], "log_probs": [], "reward": 0.0, "key": (started[i], i)} for i in rows}
        for i in rows:
            started[i] += 1
        while rows:
            obs, _ = policy.obs_to_tensor({key: np.stack([current[i][key] for i in rows]) for key in current[rows[0]]})
            with th.no_grad():
                actions, _, log_probs = policy(obs, deterministic=deterministic)
            actions, log_probs = actions.cpu().numpy(), log_probs.cpu().numpy()
            keep = []
            for j, i in enumerate(rows):
                episode = episodes[i]
                episode["obs"].append(current[i])
                episode["actions"].append(int(actions[j]))
                episode["log_probs"].append(float(log_probs[j]))
                current[i], reward, terminated, truncated, info = envs[i].step(actions[j])
                episode["reward"] += float(reward)
                if terminated or truncated:
                    finished.append(_finish_episode(episode, info))
                    remaining[i] -= 1
                    # Every time, as DummyVecEnv's auto-reset: the env is left as evaluate_policy leaves it.
                    current[i], _ = envs[i].reset()
                else:
                    keep.append(j)
            if len(keep) < len(rows):
                policy.keep_rollout_rows(th.as_tensor(keep, dtype=th.long))
                rows = [rows[j] for j in keep]
    for episode in finished:
        episode["log_probs"] = np.asarray(episode["log_probs"], dtype=np.float32)
    # Wave by wave, env by env: an order that does not depend on which episode ended first.
    return sorted(finished, key=lambda episode: episode["key"])


def sample_episodes(policy, env, n_episodes: int, deterministic: bool = False,
                    kv_cache: bool = True) -> list[dict[str, Any]]:
    """``n_episodes`` complete episodes of ``policy`` on ``env``, as :func:`evaluate_against_reference` samples them.

    With ``kv_cache``: in waves through the KV-cached rollout path (:func:`_sample_in_waves`),
    or, for a VecEnv that cannot be stepped env by env, SB3's ``evaluate_policy`` through
    :class:`CachedSampler`. Without: ``evaluate_policy`` through ``policy.predict`` (a full forward
    per step). The three draw the same prompts (env ``i``'s first ``(n_episodes + i) // n_envs``
    episodes after ``env.reset()``) and sample from the same distribution.

    :param policy: a :class:`agents.TransformerPolicy`.
    :param env: a TextGen ``VecEnv``; reseed it first (``env.seed``) for repeatable prompts.
    :param n_episodes: episodes to return, >= 1.
    :param deterministic: greedy decoding instead of sampling.
    :param kv_cache: sample through the KV-cached rollout path.
    :return: one dict per episode: ``obs`` (the observations, dicts of ``(L,)`` arrays), ``actions``
        (ints), ``reward`` (the return), ``prompt``, ``completion``, ``components`` (reward
        components besides ``score``); in waves also ``log_probs``.
    :raises ValueError: ``n_episodes < 1``, or the env's final ``info`` has no ``completion``.
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if kv_cache:
        episodes = _sample_in_waves(policy, env, n_episodes, deterministic)
        if episodes is not None:
            return episodes
    return _sample_episodes(CachedSampler(policy) if kv_cache else policy, env, n_episodes, deterministic)


def _lm_log_probs(scope, logit_mask: th.Tensor | None = None):
    """``log_prob(obs, actions)`` under the LM that ``scope()`` yields, renormalised over the tokens
    ``logit_mask`` allows (as the policy samples); one forward per episode."""
    def log_prob(obs: dict[str, th.Tensor], actions: th.Tensor) -> th.Tensor:
        with scope() as lm:
            return reference_log_probs(lm, obs["input_ids"], obs["attention_mask"], actions, logit_mask=logit_mask)
    return log_prob


def _sampling_log_probs(policy):
    """``log_prob(obs, actions)`` under the distribution ``policy`` samples from
    (``policy.get_distribution``): an NLPO policy's nucleus mask included."""
    def log_prob(obs: dict[str, th.Tensor], actions: th.Tensor) -> th.Tensor:
        with th.no_grad():
            return policy.get_distribution(obs).log_prob(actions)
    return log_prob


def _log_probs(log_prob, episodes: Sequence[dict[str, Any]], device, chunk: int = 32) -> list[np.ndarray]:
    """Per-episode log-probs of the sampled actions under ``log_prob`` (:func:`_lm_log_probs`,
    :func:`_sampling_log_probs`), ``chunk`` episodes per call."""
    out = []
    for lo in range(0, len(episodes), chunk):
        part = episodes[lo:lo + chunk]
        obs = {key: th.as_tensor(np.stack([o[key] for e in part for o in e["obs"]]), device=device)
               for key in ("input_ids", "attention_mask")}
        actions = th.as_tensor([a for e in part for a in e["actions"]], device=device)
        values = log_prob(obs, actions).cpu().numpy()
        out.extend(np.split(values, np.cumsum([len(e["actions"]) for e in part])[:-1]))
    return out


def _scored_samples(episodes: list[dict[str, Any]], log_prob, reference_log_prob, device) -> list[EpisodeSample]:
    """``episodes`` as :class:`EpisodeSample`, their actions scored under ``log_prob`` and ``reference_log_prob``."""
    log_probs = _log_probs(log_prob, episodes, device)
    ref_log_probs = log_probs if log_prob is reference_log_prob else _log_probs(reference_log_prob, episodes, device)
    return [EpisodeSample(e["prompt"], e["completion"], e["reward"], e["actions"], lp, rlp, e["components"])
            for e, lp, rlp in zip(episodes, log_probs, ref_log_probs)]


def _gather_shards(samples: list[EpisodeSample], keys: list[tuple[int, int]]) -> list[EpisodeSample]:
    """Every rank's ``samples`` in the order of their ``keys`` (as one process sorts its own);
    ``samples`` outside a data-parallel run."""
    if not collectives.is_data_parallel():
        return samples
    pairs = [pair for shard in collectives.all_gather_object(list(zip(keys, samples))) for pair in shard]
    return [sample for _, sample in sorted(pairs, key=lambda pair: pair[0])]


def _summarise(name: str, samples: list[EpisodeSample]) -> TextEvaluation:
    """The metrics of :mod:`agents.training.evaluation` over ``samples``."""
    if not samples:
        raise ValueError("no episode finished")
    rewards = np.array([s.reward for s in samples])
    kls = np.array([s.kl for s in samples])
    all_ref = np.concatenate([s.ref_log_probs for s in samples]).astype(np.float64)
    completions = [s.completion for s in samples]
    return TextEvaluation(
        name=name, n_episodes=len(samples), reward_mean=float(rewards.mean()), reward_sem=_sem(rewards),
        kl_mean=float(kls.mean()), kl_sem=_sem(kls), perplexity=float(math.exp(-all_ref.mean())),
        distinct_1=distinct_n(completions, 1), distinct_2=distinct_n(completions, 2),
        length_mean=float(np.mean([len(s.tokens) for s in samples])), episodes=samples,
        components=_component_stats(samples))


def _component_stats(samples: list[EpisodeSample]) -> dict[str, tuple[float, float]]:
    names = dict.fromkeys(name for s in samples for name in s.components)
    stats = {}
    for name in names:
        values = np.array([s.components[name] for s in samples if name in s.components])
        stats[name] = (float(values.mean()), _sem(values))
    return stats


def markdown_table(results: dict[str, TextEvaluation]) -> str:
    """The evaluations as a markdown table, one row each; one column per reward component besides ``score``."""
    names = list(dict.fromkeys(name for result in results.values() for name in result.components))
    header = ("| policy | mean reward (± s.e.) |" + "".join(f" {name} (± s.e.) |" for name in names)
              + " KL to reference (nats/episode, ± s.e.) | perplexity under reference "
              "| distinct-1 | distinct-2 | mean length (tokens) |\n|" + "---|" * (7 + len(names)))
    return "\n".join([header, *(result.row(names) for result in results.values())])


def samples_text(results: dict[str, TextEvaluation], n_samples: int = 3) -> str:
    """Completions of the same prompts by each policy, score in brackets (first prompts all policies share)."""
    by_prompt = [{e.prompt: e for e in result.episodes} for result in results.values()]
    first = next(iter(results.values())).episodes
    shared = [e.prompt for e in first if all(e.prompt in table for table in by_prompt)]
    width = max(len(name) for name in results)
    lines = []
    for prompt in list(dict.fromkeys(shared))[:n_samples]:
        lines.append(f"prompt: {prompt!r}")
        for name, table in zip(results, by_prompt):
            lines.append(f"  {name:<{width}} [{table[prompt].reward:+.2f}] {table[prompt].completion!r}")
    return "\n".join(lines)


def _reference_copy(policy):
    """A fresh policy of the pretrained LM with ``policy``'s constructor arguments; an NLPO policy's
    without its nucleus (``top_p=1``), so that every algorithm is compared with the same reference."""
    params = policy._get_constructor_parameters()
    if "top_p" in params:
        params["top_p"] = 1.0
    return type(policy)(**params)


def _as_policy(model):
    return getattr(model, "policy", model)


def evaluate_against_reference(
    model,
    env,
    n_episodes: int = 64,
    reference=None,
    deterministic: bool = False,
    seed: int | None = 0,
    n_samples: int = 3,
    tensorboard_log: Any = None,
    tag: str = "eval",
    step: int = 0,
    verbose: bool = True,
    kv_cache: bool = False,
) -> dict[str, TextEvaluation]:
    """Evaluate the reference policy and the trained policy on the same held-out prompts.

    Both are sampled through ``env`` (:func:`sample_episodes`: SB3's ``evaluate_policy`` with
    ``policy.predict``, or with ``kv_cache=True`` the KV-cached rollout path in waves of
    episodes), so the figures describe exactly the policy the env sees; then each episode is
    scored with one forward per episode (:func:`agents.algorithms.kl.reference_log_probs`) under the trained
    LM and under the reference LM. Definitions of the metrics: see :mod:`agents.training.evaluation`.

    The reference is, in this order: ``reference`` if given; for a policy with LoRA adapters, the
    same policy with adapters disabled (no second model); otherwise a fresh copy of the policy
    built from its constructor parameters, i.e. the pretrained LM (one more LM in memory while
    this runs), without NLPO's nucleus for a :class:`agents.MaskableTransformerPolicy`. The reference row's KL is exactly 0 and its perplexity is that of the reference's
    own samples.

    With ``seed`` both runs reseed ``env`` (``VecEnv.seed``) so they draw the same prompts; token
    sampling uses torch's global RNG (seed it, e.g. ``stable_baselines3.common.utils.set_random_seed``,
    for repeatable figures).

    In a data-parallel run (:func:`agents.data_parallel`; every rank calls this with an ``env``
    built and seeded alike) the episodes are sharded: rank ``r`` samples and scores those of envs
    ``i`` with ``i % world_size == r``, in waves whatever ``kv_cache`` says (the wave path is the one
    that can leave envs out), and the samples are gathered, so every rank returns the figures of
    the same episodes a single process samples in waves (equal with ``deterministic``; sampled
    tokens follow each rank's own RNG). Rank 0 alone prints and writes TensorBoard.

    :param model: an SB3 algorithm (``PPO``) or a :class:`agents.TransformerPolicy`.
    :param env: a TextGen ``VecEnv`` (or ``gym.Env``), e.g. held-out prompts (``prompts="movie_reviews:test"``).
    :param n_episodes: episodes per policy, >= 1.
    :param reference: a reference ``TransformerPolicy`` (or an SB3 algorithm holding one); ``None``: see above.
    :param deterministic: greedy decoding instead of sampling.
    :param seed: env seed for both runs; ``None``: do not reseed (the two runs then see different prompts).
    :param n_samples: prompts whose completions are shown (printed and logged).
    :param tensorboard_log: a log directory or a ``torch.utils.tensorboard.SummaryWriter``; the table
        and the samples are written as text (``add_text``) under ``{tag}/table`` and ``{tag}/samples``.
    :param tag: TensorBoard tag prefix.
    :param step: TensorBoard global step.
    :param verbose: print the table and the samples.
    :param kv_cache: sample through the policy's KV-cached rollout path (one new token per step
        from a per-env KV cache, as rollouts do, with each wave's prompts encoded in one batch;
        :func:`sample_episodes`) instead of ``predict`` (a full forward per step): the same prompts
        and distribution, several times faster (docs: guide/evaluation.md). Needs policies built with
        ``kv_cache=True`` (the default); others fall back to a full forward.
    :return: ``{"reference": TextEvaluation, "trained": TextEvaluation}``, on every rank of a
        data-parallel run.
    :raises ValueError: ``n_episodes < 1``, the env's final ``info`` has no ``completion``, or in a
        data-parallel run an env that cannot be stepped env by env (a ``SubprocVecEnv``).
    """
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv

    if not isinstance(env, VecEnv):
        env = DummyVecEnv([lambda: env])
    policy = _as_policy(model)
    policy.set_training_mode(False)
    device = policy.device
    trained_scope = lambda: contextlib.nullcontext(policy.lm)  # noqa: E731

    if reference is not None:
        ref_policy = _as_policy(reference)
        reference_scope = lambda: contextlib.nullcontext(ref_policy.lm)  # noqa: E731
        sample_reference = contextlib.nullcontext
    elif getattr(policy, "peft_model", None) is not None:
        ref_policy = policy
        reference_scope = lambda: adapters_disabled(policy)  # noqa: E731
        sample_reference = reference_scope
    else:
        ref_policy = _reference_copy(policy).to(device)
        reference_scope = lambda: contextlib.nullcontext(ref_policy.lm)  # noqa: E731
        sample_reference = contextlib.nullcontext
    ref_policy.set_training_mode(False)

    sample = _sharded_sampler(env, kv_cache)
    if seed is not None:
        env.seed(seed)
    with sample_reference():
        ref_episodes = sample(ref_policy, env, n_episodes, deterministic)
    if seed is not None:
        env.seed(seed)
    episodes = sample(policy, env, n_episodes, deterministic)

    reference_log_prob = _lm_log_probs(reference_scope)
    # An NLPO policy samples from a nucleus its LM alone does not know: score what it samples from.
    trained_log_prob = (_sampling_log_probs(policy) if getattr(policy, "masking_lm", None) is not None
                        else _lm_log_probs(trained_scope, getattr(policy, "logit_mask", None)))
    results = {}
    for name, sampled, log_prob in (("reference", ref_episodes, reference_log_prob),
                                    ("trained", episodes, trained_log_prob)):
        scored = _scored_samples(sampled, log_prob, reference_log_prob, device)
        results[name] = _summarise(name, _gather_shards(scored, [e.get("key") for e in sampled]))
    if collectives.rank() == 0:
        table, samples = markdown_table(results), samples_text(results, n_samples)
        if verbose:
            print(f"\n{table}\n\n{samples}")
        if tensorboard_log is not None:
            _write_tensorboard(tensorboard_log, tag, step, table, samples)
    return results


def _sharded_sampler(env, kv_cache: bool):
    """``sample(policy, env, n_episodes, deterministic)``: :func:`sample_episodes`, or in a
    data-parallel run this rank's shard of its episodes (:func:`_sample_in_waves`)."""
    if not collectives.is_data_parallel():
        return lambda policy, env, n_episodes, deterministic: sample_episodes(
            policy, env, n_episodes, deterministic, kv_cache)
    if _wave_envs(env) is None:
        raise ValueError(
            f"a data-parallel evaluation splits the env's envs between ranks and steps them one by one, which "
            f"{type(env).__name__} does not allow; evaluate on a DummyVecEnv (make_vec_env's default), bare or "
            f"under GroupedPrompts, BatchedRewards or VecMonitor, or evaluate on rank 0 alone outside the group")
    shard = (collectives.rank(), collectives.world_size())
    return lambda policy, env, n_episodes, deterministic: _sample_in_waves(
        policy, env, n_episodes, deterministic, shard)


def _write_tensorboard(log, tag: str, step: int, table: str, samples: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = log if isinstance(log, SummaryWriter) else SummaryWriter(log_dir=str(log))
    writer.add_text(f"{tag}/table", table, step)
    # Indented: TensorBoard's markdown shows it as a code block, line breaks and quotes kept.
    writer.add_text(f"{tag}/samples", "\n".join("    " + line for line in samples.splitlines()), step)
    writer.flush()
    if writer is not log:
        writer.close()


__all__ = ["EpisodeSample", "TextEvaluation", "distinct_n", "evaluate_against_reference",
           "markdown_table", "sample_episodes", "samples_text"]
