"""Rollout, update and per-iteration cost against their practical limits. Prints markdown tables.

    python benchmarks/performance.py                  # tiny GPT-2, SmolLM2-135M plain and chat, ~20 min on 2 cores
    python benchmarks/performance.py --models tiny    # about a minute
    python benchmarks/performance.py --tables update  # one table

Every case runs in a fresh subprocess, so its peak RSS is its own. Tables:

1. **Rollout**: bytes per stored transition (ours vs SB3's ``DictRolloutBuffer``) and generated tokens/s through SB3's ``PPO.collect_rollouts`` (KV-cached, and with
   ``kv_cache=False``) vs ``model.generate`` of the same LM, batch (``n_envs`` rows), length
   (``T`` new tokens, no early EOS), sampling (plain ancestral, temperature 1) and KV cache, in
   the same process. Target: cached rollout >= 0.8 x generate. The env's reward model is a
   constant here, so the table compares decoding alone (reward-model cost is in table 3).
2. **Update**: transitions/s of what ``PPO.train`` does per minibatch (``evaluate_actions`` +
   backward) with one forward per episode vs one per transition (SB3's own ``evaluate_actions``,
   timed on 64 transitions). Target: speed-up >= T / 2.
3. **PPO iteration of the examples' jobs** (``examples/train_sentiment.py``'s settings: SmolLM2-135M,
   sentiment reward model, movie-review prompts, 8 envs, 16 new tokens, ``text_ppo_kwargs()``,
   KL penalty; and ``examples/train_reasoning.py``'s: the same in chat mode on reasoning-gym
   chain_sum with its verifier; and ``examples/train_textarena.py``'s multi-turn GuessTheNumber):
   seconds per iteration split into rollout (policy + env), reward model, reference model, update
   and other (``learn``'s own bookkeeping), generated tokens/s and peak RSS, for each variant of
   :data:`ITERATION_VARIANTS` (the code path before the shared prefix, today's defaults, activation
   checkpointing) in its own process, one after the other, so their ratios come from one run.
   ``--jobs reasoning TextArena`` picks jobs.
4. **Torch threads**: the first rollout and update case of SmolLM2 with 1 and 2 threads.
5. **Multi-turn rollout** (``--tables dialogue``): agent tokens/s of ``collect_rollouts`` on
   :class:`textgym.dialogue.DialogueEnv` episodes of ``--turns`` replies of ``T`` tokens each
   (the opening of TextArena's GuessTheNumber, a fixed hint after each reply), against the
   turn-level way of writing the same replies: ``generate`` of ``T`` tokens per turn on the
   whole conversation so far, re-encoded through the chat template each turn (what a library
   that steps once per reply does). The iteration table (3) also has the TextArena demo's job.
6. **Reward scoring** (``--tables rewards``): seconds in the sentiment job's reward model (the
   fine-tuned MiniLM reward model) per PPO iteration of 32 steps per env, with each env scoring
   its own text (one call per finished episode) and with :class:`textgym.vec_env.BatchedRewards`
   (one call per step for all episodes ending in it), at ``--reward-envs`` envs. Actions are
   uniformly random token ids (16-token episodes, all ending together, as in the main job where
   the mean length is 16.0); the reward model's cost does not depend on the policy. Mean of 3
   iterations after one warm-up.
7. **Compute** (``--tables compute``): one PPO epoch of the main job's update (SmolLM2-135M,
   8 envs x 32 steps, 16 new tokens, minibatches of 128) per ``--dtypes``: its floating-point
   operations counted by ``torch.utils.flop_counter.FlopCounterMode``, their rate, the seconds of
   the optimizer steps after the minibatches, and the rate of a dense matmul on the same threads,
   so the table says how close the update runs to what the CPU can do.

Models: ``tiny`` (2-layer GPT-2), ``smollm2`` (SmolLM2-135M-Instruct continuing 6-word movie-review
openings) and ``smollm2-chat`` (the same LM in chat mode on the reasoning demo's questions: the
chat template makes every prompt 43 tokens instead of 6-19).

Run it alone: on 2 cores, a second busy process makes multi-threaded torch many times slower.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from textgym.dialogue import DialogueGame

def zero_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Constant reward: keeps the reward model out of the decoding comparison."""
    return [0.0] * len(prompts)


SENTIMENT_JOB = dict(max_new_tokens=16)
"""``examples/train_sentiment.py``'s env: the defaults of ``TextGen-v0`` with 16 new tokens."""

REASONING_JOB = dict(task="chain_sum", task_config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1),
                     max_new_tokens=16)
"""``examples/train_reasoning.py``'s task: reasoning-gym chain_sum, two 1-digit terms, 16 new tokens."""


TEXTARENA_JOB = dict(game="GuessTheNumber-v0", max_reply_tokens=8, max_prompt_tokens=256, max_context_tokens=384,
                     system_prompt="You are playing a game. Read the rules carefully and always answer in the required format.")
"""``examples/train_textarena.py``'s job: TextArena GuessTheNumber, 8-token replies (its "reward model" is the game)."""


def rollout_env_kwargs(model: str, tmp: str, max_new_tokens: int) -> dict:
    """Full-length episodes (no EOS), constant reward; the tiny GPT-2, the default SmolLM2 on
    movie-review openings, or SmolLM2 in chat mode on the reasoning demo's questions (``smollm2-chat``:
    system line + question through the chat template, 43 prompt tokens instead of 6-19)."""
    from textgym.tiny import save_tiny_lm

    kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=None, reward_model=zero_reward)
    if model == "tiny":
        kwargs.update(model_name_or_path=str(save_tiny_lm(tmp, n_positions=128)), max_prompt_tokens=8,
                      prompts=["the movie was", "a film is", "one two", "the film was very"])
    if model == "smollm2-chat":
        from textgym.tasks.reasoning import DEFAULT_SYSTEM_PROMPT, reasoning_splits

        splits = reasoning_splits(REASONING_JOB["task"], REASONING_JOB["task_config"])
        kwargs.update(prompts=[e["question"] for e in splits.train], chat_template=True,
                      system_prompt=DEFAULT_SYSTEM_PROMPT, max_prompt_tokens=None)
    return kwargs


def timed_rollouts(ppo, n_rollouts: int) -> list[float]:
    """Seconds of each of ``n_rollouts`` calls of SB3's ``collect_rollouts`` (``train`` skipped)."""
    seconds: list[float] = []
    collect = ppo.collect_rollouts

    def timed_collect(*args, **kwargs):
        start = time.perf_counter()
        result = collect(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    ppo.collect_rollouts, ppo.train = timed_collect, lambda: None
    ppo.learn(n_rollouts * ppo.n_steps * ppo.n_envs)
    return seconds


def generate_seconds(lm, env, max_new_tokens: int, repeats: int) -> list[float]:
    """Seconds of ``lm.generate`` on the env's next prompts: same batch, length and sampling as a
    rollout of fixed-length episodes (``min_new_tokens`` holds the stop token back: every reply
    runs the full ``max_new_tokens``)."""
    batch, config = generate_inputs(env, max_new_tokens, stop_at_eos=False)
    calls = timed_generate(lm, batch, config, repeats)
    assert calls[-1][1].shape[1] == batch["input_ids"].shape[1] + max_new_tokens
    return [seconds for seconds, _ in calls]


def generate_until_stop_rate(lm, env, max_new_tokens: int, repeats: int) -> tuple[float, float]:
    """``lm.generate`` as an episode ends: each reply stops at the env's stop tokens, the batch runs
    until its longest reply has ended. Returns ``(tokens/s, mean reply length)`` over ``repeats``
    calls after a warm-up, counting each reply's tokens up to and including its stop token (what an
    episode samples), not the padding after it."""
    batch, config = generate_inputs(env, max_new_tokens, stop_at_eos=True)
    stops = torch.tensor(config.eos_token_id)
    seconds, kept = 0.0, 0
    for elapsed, out in timed_generate(lm, batch, config, repeats + 1)[1:]:  # the first call warms up
        replies = out[:, batch["input_ids"].shape[1]:]
        stopped = torch.isin(replies, stops)
        first_stop = torch.where(stopped.any(1), stopped.int().argmax(1) + 1, replies.shape[1])
        seconds, kept = seconds + elapsed, kept + int(first_stop.sum())
    return kept / seconds, kept / (repeats * len(replies))


def timed_generate(lm, batch: dict, config, repeats: int) -> list[tuple[float, torch.Tensor]]:
    """``repeats`` calls of ``lm.generate(**batch)`` without grad: ``(seconds, output ids)`` of each."""
    calls = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            out = lm.generate(**batch, generation_config=config)
            calls.append((time.perf_counter() - start, out))
    return calls


def generate_inputs(env, max_new_tokens: int, stop_at_eos: bool) -> tuple[dict, object]:
    """The env's next prompts, left-padded as batched ``generate`` expects, and the sampling config."""
    from transformers import GenerationConfig

    unwrapped = env.envs[0].unwrapped
    tokenizer = unwrapped.tokenizer
    # The env's own prompt encoding (chat template included).
    ids = [e.unwrapped.encode_prompts([e.unwrapped.prompts[i % len(e.unwrapped.prompts)]])[0]
           for i, e in enumerate(env.envs)]
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    stops = sorted(unwrapped.stop_token_ids) if stop_at_eos else tokenizer.eos_token_id
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              min_new_tokens=None if stop_at_eos else max_new_tokens, use_cache=True,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=stops)
    return batch, config


def case_rollout(model: str, n_envs: int, max_new_tokens: int) -> dict:
    """Table 1: tokens/s of cached and uncached ``collect_rollouts`` and of ``generate``."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.buffers import DictRolloutBuffer
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, text_ppo_kwargs

    tokens = n_envs * max_new_tokens
    with tempfile.TemporaryDirectory() as tmp:
        env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=rollout_env_kwargs(model, tmp, max_new_tokens))
        result = {}
        for cached in (True, False):
            ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(
                n_steps=max_new_tokens, policy_kwargs=dict(kv_cache=cached)))
            # The first rollout warms up (allocations, lazy imports); the best of the others counts.
            seconds = timed_rollouts(ppo, 3 if cached else 2)[1:]
            result["cached" if cached else "uncached"] = tokens / min(seconds)
        result["bytes"] = ppo.rollout_buffer.bytes_per_transition
        sb3 = DictRolloutBuffer(1, env.observation_space, env.action_space)  # SB3's own storage, for comparison
        result["sb3_bytes"] = sum(a.nbytes for a in (*sb3.observations.values(), sb3.actions, sb3.rewards, sb3.returns,
                                                     sb3.episode_starts, sb3.values, sb3.log_probs, sb3.advantages))
        result["generate"] = tokens / min(generate_seconds(ppo.policy.lm, env, max_new_tokens, repeats=3)[1:])
    result["ratio"] = result["cached"] / result["generate"]
    return result


def time_epoch(policy, batches: list, grouped: bool) -> float:
    """Seconds of ``evaluate_actions`` + backward over ``batches``, as ``PPO.train`` runs per minibatch."""
    policy.share_prefix_forward = grouped
    start = time.perf_counter()
    for batch in batches:
        policy.zero_grad()
        values, log_prob, entropy = policy.evaluate_actions(batch.observations, batch.actions.long().flatten())
        (values.sum() + log_prob.sum() + entropy.sum()).backward()
    return time.perf_counter() - start


def rollout_minibatches(model: str, n_envs: int, max_new_tokens: int, batch_size: int, tmp: str,
                        **ppo_overrides) -> tuple:
    """``(ppo, minibatches)``: SB3's PPO with ``text_ppo_kwargs`` on the ``model`` case's env after one
    rollout of ``2 * max_new_tokens`` steps per env, and that rollout's minibatches of ``batch_size``
    in the order numpy seed 0 shuffles them (what the update and compute tables time)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, text_ppo_kwargs

    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=rollout_env_kwargs(model, tmp, max_new_tokens))
    n_steps = 2 * max_new_tokens
    ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=n_steps, batch_size=batch_size, **ppo_overrides))
    ppo.learn(n_steps * n_envs)
    np.random.seed(0)
    return ppo, list(ppo.rollout_buffer.get(batch_size))


def case_update(model: str, n_envs: int, max_new_tokens: int, batch_size: int = 128,
                per_transition_rows: int = 64) -> dict:
    """Table 2: transitions/s with one forward per episode vs one per transition, same minibatches.

    The per-transition path is timed on the first ``per_transition_rows`` transitions of the first
    minibatch only: an epoch of it costs minutes on SmolLM2, and a whole minibatch of 128 windows
    with grad held 21 GB of activations at T = 64. Both rates are transitions per second.
    """
    with tempfile.TemporaryDirectory() as tmp:
        ppo, batches = rollout_minibatches(model, n_envs, max_new_tokens, batch_size, tmp)
        count = lambda bs: sum(len(b.actions) for b in bs)  # noqa: E731
        time_epoch(ppo.policy, batches[:1], grouped=True)  # warm-up
        grouped = count(batches) / time_epoch(ppo.policy, batches, grouped=True)
        first = batches[0]
        rows = slice(0, per_transition_rows)
        few = [first._replace(observations={k: v[rows] for k, v in first.observations.items()}, actions=first.actions[rows])]
        per_transition = count(few) / time_epoch(ppo.policy, few, grouped=False)
    return dict(transitions=count(batches), grouped=grouped, per_transition=per_transition,
                speedup=grouped / per_transition)


def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """GFLOP/s of a dense ``(m, k) @ (k, n)`` matmul in ``dtype`` on this process's torch threads."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up: oneDNN picks its kernel on the first call
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def case_compute(model: str, n_envs: int, max_new_tokens: int, dtype: str, batch_size: int = 128) -> dict:
    """Table 7: what one PPO epoch of the main job computes, how fast, and the optimizer's share.

    Floating-point operations of ``evaluate_actions`` + backward are counted by
    ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention; elementwise work is not
    counted) on one epoch of minibatches, then the same epoch is timed without the counter, and
    separately the optimizer steps that ``PPO.train`` takes after each minibatch (gradient clipping
    + Adam, with the bfloat16 policy's float32 master weights). The dense-matmul rates are the
    practical ceiling on these threads: a square 2048 matmul and one of the trunk's MLP shape.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with tempfile.TemporaryDirectory() as tmp:
        ppo, batches = rollout_minibatches(model, n_envs, max_new_tokens, batch_size, tmp,
                                           policy_kwargs=dict(dtype=dtype))
        policy = ppo.policy
        policy.set_training_mode(True)
        time_epoch(policy, batches[:1], grouped=True)  # warm-up
        counter = FlopCounterMode(display=False)
        with counter:
            time_epoch(policy, batches, grouped=True)
        compute = min(time_epoch(policy, batches, grouped=True) for _ in range(2))
        start = time.perf_counter()
        for _ in batches:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), ppo.max_grad_norm)
            policy.optimizer.step()
        optimizer = time.perf_counter() - start
        config = policy.lm.config.get_text_config()
        torch_dtype = getattr(torch, dtype)
    return dict(minibatches=len(batches), transitions=sum(len(b.actions) for b in batches),
                gflop=counter.get_total_flops() / 1e9, compute_seconds=compute, optimizer_seconds=optimizer,
                dense_square=matmul_rate(2048, 2048, 2048, torch_dtype),
                dense_mlp=matmul_rate(512, config.hidden_size, config.intermediate_size, torch_dtype))


def timed(clock: dict, name: str, fn, calls: dict | None = None):
    """``fn`` wrapped so that each call adds its seconds to ``clock[name]`` (and 1 to ``calls[name]``)."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[name] += time.perf_counter() - start
            if calls is not None:
                calls[name] += 1
    return wrapper


def case_iteration(n_envs: int, iterations: int, env_id: str = "TextGen-v0",
                   env_kwargs: dict | None = None, policy_kwargs: dict | None = None) -> dict:
    """Table 3: seconds per PPO iteration of a job (default: the sentiment defaults), split by component;
    ``policy_kwargs`` go to :func:`agents.text_ppo_kwargs` (e.g. ``{"dtype": "bfloat16"}``)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import AdaptiveKLController, KLPenaltyCallback, TransformerPolicy, text_ppo_kwargs

    env = make_vec_env(env_id, n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(policy_kwargs=policy_kwargs))
    clock = {"reward model": 0.0, "reference model": 0.0, "update": 0.0, "collect": 0.0}

    for e in env.envs:
        if hasattr(e.unwrapped, "reward_fn"):
            e.unwrapped.reward_fn = timed(clock, "reward model", e.unwrapped.reward_fn)
        else:  # a dialogue: the game scores the replies
            e.unwrapped.game.respond = timed(clock, "reward model", e.unwrapped.game.respond)
    kl = KLPenaltyCallback(AdaptiveKLController(0.05, target=4.0))
    kl._on_rollout_end = timed(clock, "reference model", kl._on_rollout_end)
    ppo.collect_rollouts = timed(clock, "collect", ppo.collect_rollouts)
    ppo.train = timed(clock, "update", ppo.train)
    per_iteration = ppo.n_steps * n_envs
    ppo.learn(per_iteration, callback=kl)  # warm-up iteration (and the reference model's loading)
    for key in clock:
        clock[key] = 0.0
    start = time.perf_counter()
    ppo.learn(iterations * per_iteration, callback=kl, reset_num_timesteps=False)
    seconds = {key: value / iterations for key, value in clock.items()}
    seconds["total"] = (time.perf_counter() - start) / iterations
    # collect_rollouts includes the reward model (env.step) and the KL callback (rollout end);
    # "other" is learn()'s own time outside both (logging, callbacks, SB3's bookkeeping).
    seconds["rollout"] = seconds.pop("collect") - seconds["reward model"] - seconds["reference model"]
    seconds["other"] = seconds["total"] - sum(seconds[k] for k in ("rollout", "reward model", "reference model", "update"))
    seconds["transitions"] = per_iteration
    return seconds


class FixedAnswers(DialogueGame):
    """A :class:`textgym.dialogue.DialogueGame` for timing: TextArena GuessTheNumber's opening, then the
    same hint after every reply, over after ``turns`` replies (reward 0)."""

    HINT = "The target number is higher."

    def __init__(self, turns: int):
        from textgym.tasks.textarena import TextArenaGame

        self.turns, self.replies = turns, 0
        self.opening = TextArenaGame("GuessTheNumber-v0").reset(seed=0)

    def reset(self, seed=None) -> str:
        self.replies = 0
        return self.opening

    def respond(self, reply: str):
        self.replies += 1
        return self.HINT, 0.0, self.replies >= self.turns

    def info(self) -> dict:
        return {}


def turn_level_generate_seconds(lm, tokenizer, opening: str, n_envs: int, reply_tokens: int, turns: int) -> float:
    """Seconds to write ``turns`` replies of ``reply_tokens`` tokens for ``n_envs`` conversations with
    ``generate``, re-encoding each conversation through the chat template every turn."""
    from transformers import GenerationConfig

    from textgym.chat import render_chat

    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=reply_tokens,
                              min_new_tokens=reply_tokens, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    tokenizer.padding_side = "left"
    conversations = [[{"role": "user", "content": opening}] for _ in range(n_envs)]
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(turns):
            batch = tokenizer.pad({"input_ids": [render_chat(tokenizer, c) for c in conversations]}, return_tensors="pt")
            out = lm.generate(**batch, generation_config=config)
            for conversation, reply in zip(conversations, out[:, batch["input_ids"].shape[1]:]):
                text = tokenizer.decode(reply, skip_special_tokens=True)
                conversation += [{"role": "assistant", "content": text}, {"role": "user", "content": FixedAnswers.HINT}]
    return time.perf_counter() - start


def case_dialogue(model: str, n_envs: int, reply_tokens: int, turns: int) -> dict:
    """Table 5: agent tokens/s of KV-cached ``collect_rollouts`` on multi-turn episodes vs turn-level ``generate``."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    from agents import TransformerPolicy, text_ppo_kwargs
    from textgym.dialogue import DialogueEnv
    from textgym.tiny import save_tiny_lm

    tokens = n_envs * turns * reply_tokens
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = dict(game=FixedAnswers(turns), eos_token_id=None, max_reply_tokens=reply_tokens,
                      max_prompt_tokens=200, max_context_tokens=turns * (reply_tokens + 16))
        if model == "tiny":
            kwargs.update(model_name_or_path=str(save_tiny_lm(tmp, n_positions=512, chat=True)))
        env = make_vec_env(DialogueEnv, n_envs=n_envs, seed=0, env_kwargs=kwargs)
        ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=turns * reply_tokens))
        seconds = timed_rollouts(ppo, 3)[1:]
        lm, game = ppo.policy.lm, env.envs[0].unwrapped
        generate = [turn_level_generate_seconds(lm, game.tokenizer, game.game.opening, n_envs, reply_tokens, turns)
                    for _ in range(3)][1:]
    result = {"cached": tokens / min(seconds), "generate": tokens / min(generate),
              "context_tokens": int(ppo.rollout_buffer.observations["attention_mask"][-1].sum(-1).max())}
    result["ratio"] = result["cached"] / result["generate"]
    return result


def case_rewards(n_envs: int, batched: bool, iterations: int = 3, n_steps: int = 32) -> dict:
    """Reward-model seconds and calls per iteration of ``n_steps`` random steps per env."""
    from stable_baselines3.common.env_util import make_vec_env

    from textgym.rewards import default_reward_model
    from textgym.vec_env import BatchedRewards

    clock, calls = {"reward": 0.0}, {"reward": 0}
    reward = timed(clock, "reward", default_reward_model(), calls)  # one callable shared by all envs
    venv = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs={**SENTIMENT_JOB, "reward_model": reward})
    venv = BatchedRewards(venv) if batched else venv
    rng = np.random.default_rng(0)
    venv.reset()
    seconds, counts = [], []
    for _ in range(iterations + 1):
        clock["reward"], calls["reward"] = 0.0, 0
        for _ in range(n_steps):
            venv.step(rng.integers(0, venv.action_space.n, n_envs))
        seconds.append(clock["reward"])
        counts.append(calls["reward"])
    return {"seconds": float(np.mean(seconds[1:])), "calls": float(np.mean(counts[1:])),
            "episodes": n_envs * n_steps / SENTIMENT_JOB["max_new_tokens"]}


TABLES = ["rollout", "update", "iteration", "threads", "dialogue", "rewards", "compute"]
MODELS = ["tiny", "smollm2", "smollm2-chat"]


def run_case(args: argparse.Namespace, case: list, threads: int | None = None) -> dict:
    """Run one case in a fresh interpreter (``threads`` torch threads, default ``--threads``); its result with ``peak_rss_mib``."""
    command = [sys.executable, __file__, "--threads", str(threads or args.threads), "--case", json.dumps(case)]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    kind, *params = json.loads(args.case)
    cases = {"rollout": case_rollout, "update": case_update, "iteration": case_iteration, "dialogue": case_dialogue,
             "rewards": case_rewards, "compute": case_compute}
    result = cases[kind](*params)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run_cases(args: argparse.Namespace, results: dict, kind: str):
    """Run case ``kind`` for every model and T; yield ``(model, T, result)`` and keep each in ``results``."""
    for model in args.models:
        for t in args.max_new_tokens:
            results[kind, model, t] = run_case(args, [kind, model, args.n_envs, t])
            yield model, t, results[kind, model, t]


def rollout_table(args: argparse.Namespace, results: dict) -> None:
    print("Rollout: generated tokens/s (target: KV-cached collect_rollouts >= 0.8 x generate)\n")
    print("| model | T | collect_rollouts, KV cache | collect_rollouts, no cache | generate | ratio cached / generate "
          "| peak RSS (MiB) | buffer bytes/transition (SB3's DictRolloutBuffer) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, t, r in run_cases(args, results, "rollout"):
        print(f"| {model} | {t} | {r['cached']:.1f} | {r['uncached']:.1f} | {r['generate']:.1f} | "
              f"{r['ratio']:.2f} | {r['peak_rss_mib']:.0f} | {r['bytes']:.0f} ({r['sb3_bytes']:.0f}) |", flush=True)


def update_table(args: argparse.Namespace, results: dict) -> None:
    print("\nUpdate: transitions/s of evaluate_actions + backward (target: speed-up >= T/2)\n")
    print("| model | T | transitions | one forward per episode | one forward per transition (64 of them) | speed-up | T/2 "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, t, r in run_cases(args, results, "update"):
        print(f"| {model} | {t} | {r['transitions']} | {r['grouped']:.1f} | {r['per_transition']:.1f} | "
              f"{r['speedup']:.1f}x | {t / 2:.0f} | {r['peak_rss_mib']:.0f} |", flush=True)


ITERATION_VARIANTS = {"no shared prefix (before 2026-12-06)": {"min_shared_prefix": None}, "defaults": {},
                      "activation checkpointing": {"gradient_checkpointing": True}}
"""Rows of the iteration table per job: label -> ``policy_kwargs`` on top of the defaults; the first is
the baseline of the "time vs first row" column."""


def iteration_table(args: argparse.Namespace) -> None:
    jobs = {"sentiment (train_sentiment.py)": ("TextGen-v0", SENTIMENT_JOB),
            "reasoning, chat (train_reasoning.py)": ("TextGen-Reasoning-v0", REASONING_JOB),
            "TextArena GuessTheNumber, multi-turn (train_textarena.py)": ("TextArena-v0", TEXTARENA_JOB)}
    print(f"\nPPO iteration of the examples' jobs (SmolLM2-135M, {args.n_envs} envs x 32 steps, 16 new tokens, "
          f"KL penalty): seconds per iteration, mean of {args.iterations}; every step generates one token\n")
    print("| job | variant | rollout (policy + env) | reward model (or game) | reference model | update | other | total "
          "| generated tokens/s | time vs first row | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (env_id, env_kwargs) in jobs.items():
        if args.jobs and not any(j in name for j in args.jobs):
            continue
        baseline = None
        for variant, policy_kwargs in ITERATION_VARIANTS.items():
            r = run_case(args, ["iteration", args.n_envs, args.iterations, env_id, env_kwargs, policy_kwargs])
            baseline = baseline or r["total"]
            print(f"| {name} | {variant} | {r['rollout']:.2f} | {r['reward model']:.2f} | {r['reference model']:.2f} | "
                  f"{r['update']:.2f} | {r['other']:.2f} | {r['total']:.2f} | {r['transitions'] / r['total']:.1f} | "
                  f"{r['total'] / baseline:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)


def threads_table(args: argparse.Namespace, results: dict) -> None:
    model, t = ("smollm2" if "smollm2" in args.models else args.models[-1]), args.max_new_tokens[0]
    print(f"\nTorch threads ({model}, T = {t}): the tables above used {args.threads}\n")
    print("| threads | rollout, KV cache (tokens/s) | generate (tokens/s) | update, one forward per episode (transitions/s) |")
    print("|---|---|---|---|")
    for threads in sorted({1, 2, args.threads}):
        rollout = results.get(("rollout", model, t)) if threads == args.threads else None
        rollout = rollout or run_case(args, ["rollout", model, args.n_envs, t], threads)
        update = results.get(("update", model, t)) if threads == args.threads else None
        update = update or run_case(args, ["update", model, args.n_envs, t], threads)
        print(f"| {threads} | {rollout['cached']:.1f} | {rollout['generate']:.1f} | {update['grouped']:.1f} |", flush=True)


def dialogue_table(args: argparse.Namespace) -> None:
    print(f"\nMulti-turn rollout: agent tokens/s over {args.turns} turns of T tokens, KV-cached collect_rollouts vs "
          "turn-level generate (each turn re-encodes the conversation)\n")
    print("| model | T | turns | context tokens at the end | collect_rollouts, KV cache | turn-level generate | ratio | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in args.models:
        if model == "smollm2-chat":
            continue  # the dialogue env is always in chat mode: "smollm2" is the same case
        for t in args.max_new_tokens:
            r = run_case(args, ["dialogue", model, args.n_envs, t, args.turns])
            print(f"| {model} | {t} | {args.turns} | {r['context_tokens']} | {r['cached']:.1f} | {r['generate']:.1f} | "
                  f"{r['ratio']:.2f} | {r['peak_rss_mib']:.0f} |", flush=True)


def rewards_table(args: argparse.Namespace) -> None:
    print("\nReward scoring: reward-model seconds per PPO iteration (32 steps per env, 16-token episodes), "
          "per-env calls vs BatchedRewards\n")
    print("| envs | episodes per iteration | per env: calls | per env: seconds | batched: calls | batched: seconds "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n_envs in args.reward_envs:
        single, batched = (run_case(args, ["rewards", n_envs, b]) for b in (False, True))
        print(f"| {n_envs} | {single['episodes']:.0f} | {single['calls']:.0f} | {single['seconds']:.3f} | "
              f"{batched['calls']:.0f} | {batched['seconds']:.3f} | {single['seconds'] / batched['seconds']:.1f}x |",
              flush=True)


def compute_table(args: argparse.Namespace) -> None:
    model, t = "smollm2", 16
    print(f"\nCompute: one PPO epoch of the main job ({model}, {args.n_envs} envs x {2 * t} steps, T = {t}, "
          "minibatches of 128), counted FLOPs against dense matmul on the same threads\n")
    print("| dtype | minibatches | GFLOP (forward + backward) | forward + backward (s) | GFLOP/s "
          "| optimizer steps (s) | dense matmul GFLOP/s: 2048³ / MLP shape (512×576×1536) | update / dense 2048³ "
          "| peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        r = run_case(args, ["compute", model, args.n_envs, t, dtype])
        rate = r["gflop"] / r["compute_seconds"]
        print(f"| {dtype} | {r['minibatches']} | {r['gflop']:.0f} | {r['compute_seconds']:.2f} | {rate:.0f} "
              f"| {r['optimizer_seconds']:.2f} | {r['dense_square']:.0f} / {r['dense_mlp']:.0f} "
              f"| {rate / r['dense_square']:.2f} | {r['peak_rss_mib']:,.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every case")
    parser.add_argument("--iterations", type=int, default=2, help="timed PPO iterations on the defaults")
    parser.add_argument("--tables", nargs="+", default=TABLES, choices=TABLES,
                        help="which tables; 'threads' re-runs the last model's first rollout and update case with 1 and 2 threads")
    parser.add_argument("--turns", type=int, default=4, help="replies per multi-turn episode (dialogue table)")
    parser.add_argument("--reward-envs", type=int, nargs="+", default=[8, 32], help="env counts of the rewards table")
    parser.add_argument("--jobs", nargs="+", help="iteration table: only the jobs whose name contains one of these "
                        "(sentiment, reasoning, TextArena)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="policy dtypes of the compute table")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        return child(args)

    import textgym

    print(f"torch {torch.__version__}, {args.threads} torch threads, n_envs {args.n_envs}, textgym {textgym.__version__}, "
          f"{torch.get_num_interop_threads()} interop threads, CPU count {len(__import__('os').sched_getaffinity(0))}\n")
    results: dict[tuple, dict] = {}
    if "rollout" in args.tables:
        rollout_table(args, results)
    if "update" in args.tables:
        update_table(args, results)
    if "iteration" in args.tables and any(m.startswith("smollm2") for m in args.models):
        iteration_table(args)
    if "threads" in args.tables:
        threads_table(args, results)
    if "dialogue" in args.tables:
        dialogue_table(args)
    if "rewards" in args.tables:
        rewards_table(args)
    if "compute" in args.tables:
        compute_table(args)


if __name__ == "__main__":
    main()
