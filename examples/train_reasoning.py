"""Fine-tune SmolLM2-135M-Instruct with SB3 PPO on a reasoning-gym task with a verifiable reward.

RL with verifiable rewards (Shao et al. 2024; Lambert et al. 2024) on the token-level env:
``TextGen-Reasoning-v0`` renders each question through SmolLM2's chat template after a system line
asking for ``<answer>...</answer>``, the reply ends at ``<|im_end|>``, and the reward is the task's
own verifier (``score_answer``) applied to the extracted answer (:mod:`textgym.rewards.verifiable`).
The default task, ``chain_sum`` with two 1-digit terms ("State the final answer to the following
arithmetic problem: 4 + 7 ="), was chosen by measurement: the base model answers about 1 in 8
correctly (clearly above 0, far below 1). After training, :func:`agents.evaluate_against_reference`
samples the pretrained reference and the trained policy on the same *held-out* questions (disjoint
from training) and prints accuracy (``correct``), format rate (``format``), KL and length; the run
then states whether held-out accuracy rose by more than 2 standard errors::

    python examples/train_reasoning.py                          # ~15 min on a 2-core CPU
    python examples/train_reasoning.py --task gcd --task-config '{}'
    torchrun --standalone --nproc-per-node 2 examples/train_reasoning.py   # data-parallel, 2 ranks (agents.data_parallel)
    tensorboard --logdir runs/
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import textgym  # noqa: F401  (registers TextGen-Reasoning-v0)
from agents import (AdaptiveKLController, KLPenaltyCallback, SampleTextCallback, TransformerPolicy, data_parallel,
                    evaluate_against_reference, local_device, text_ppo_kwargs)
from agents.distributed.collectives import rank, world_size
from agents.training.evaluation import write_summary

DEFAULT_TASK_CONFIG = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)


def check_accuracy(results: dict, max_kl: float) -> bool:
    """Print whether held-out accuracy rose by more than 2 s.e. with KL within ``max_kl``; True if both held."""
    (ref_acc, ref_se), (acc, se) = results["reference"].components["correct"], results["trained"].components["correct"]
    gain, gain_se = acc - ref_acc, (se ** 2 + ref_se ** 2) ** 0.5
    kl = results["trained"].kl_mean
    checks = [(gain > 2 * gain_se, f"held-out accuracy {ref_acc:.3f} -> {acc:.3f}: {gain:+.3f} ± {gain_se:.3f} s.e. "
                                   f"({'more' if gain > 2 * gain_se else 'less'} than 2 s.e.)"),
              (kl <= max_kl, f"KL to the reference {kl:.2f} nats per episode (bound {max_kl:g})")]
    print()
    for ok, text in checks:
        print(f"{'ok     ' if ok else 'WARNING'} {text}")
    return all(ok for ok, _ in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="chain_sum", help="reasoning-gym dataset name")
    parser.add_argument("--task-config", type=json.loads, default=DEFAULT_TASK_CONFIG,
                        help="the dataset's config as JSON (default: two 1-digit terms)")
    parser.add_argument("--test-size", type=int, default=100,
                        help="held-out questions; the default task has only 200 distinct questions, so 100 draws "
                             "(74 distinct) leave 126 distinct ones for training")
    parser.add_argument("--timesteps", type=int, default=6144, help="environment steps (= generated tokens)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--n-steps", type=int, default=32, help="steps per env per rollout")
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--kl-coef", type=float, default=0.05, help="initial KL coefficient beta; 0 disables the penalty")
    parser.add_argument("--kl-target", type=float, default=4.0, help="target KL per episode (nats) of the adaptive controller")
    parser.add_argument("--format-weight", type=float, default=0.0, help="reward for a well-formatted <answer> reply")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per machine, shared by its ranks under torchrun")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/")
    parser.add_argument("--save", default=None, help="path to save the trained model (SB3 zip)")
    parser.add_argument("--results-json", default=None,
                        help="write the held-out figures, the last rollout's KL and the wall times to this JSON file")
    args = parser.parse_args()

    threads = max(1, args.threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    start = time.perf_counter()
    env_kwargs = dict(task=args.task, task_config=args.task_config, max_new_tokens=args.max_new_tokens,
                      format_weight=args.format_weight, test_size=args.test_size)
    train_env = make_vec_env("TextGen-Reasoning-v0", n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    # Under torchrun, data_parallel makes this one DD-PPO run over the ranks; with python it changes nothing.
    model = data_parallel(PPO(TransformerPolicy, train_env, seed=args.seed, verbose=1, device=local_device(),
                              tensorboard_log=args.tensorboard_log,
                              **text_ppo_kwargs(learning_rate=args.learning_rate, n_steps=args.n_steps)))
    kl = KLPenaltyCallback(AdaptiveKLController(args.kl_coef, target=args.kl_target)) if args.kl_coef > 0 else None
    samples = SampleTextCallback(n_samples=4)  # a few replies, 4 times per run, to TensorBoard and here
    model.learn(total_timesteps=args.timesteps, progress_bar=True, tb_log_name=f"reasoning_{args.task}",
                callback=[c for c in (kl, samples) if c is not None])
    train_seconds = time.perf_counter() - start

    if rank() == 0:  # every rank evaluates its share of the episodes, rank 0 prints the table of all
        print("\nheld-out questions: 'reference' = the pretrained model (before training), 'trained' = after")
    held_out = make_vec_env("TextGen-Reasoning-v0", n_envs=args.n_envs, env_kwargs=dict(env_kwargs, split="test"))
    results = evaluate_against_reference(model, held_out, n_episodes=args.eval_episodes, seed=10_000 + args.seed,
                                         kv_cache=True, tensorboard_log=model.logger.get_dir(), tag="heldout",
                                         step=model.num_timesteps)
    if rank() == 0:
        check_accuracy(results, max_kl=2 * args.kl_target)
        print(f"\nwall time {time.perf_counter() - start:.0f} s ({train_seconds:.0f} s to load and train "
              f"{args.timesteps} steps), torch threads {threads} per rank")
    if args.results_json and rank() == 0:
        write_summary(args.results_json, results, demo="reasoning", seed=args.seed, timesteps=args.timesteps,
                      world_size=world_size(), threads=threads, train_seconds=train_seconds,
                      wall_seconds=time.perf_counter() - start, last_rollout={k: float(v) for k, v in (kl.stats if kl is not None else {}).items()})
    if args.save:
        model.save(args.save)  # rank 0 alone writes in a data-parallel run


if __name__ == "__main__":
    main()
