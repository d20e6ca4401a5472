"""Fine-tune SmolLM2-135M-Instruct with SB3 PPO to continue movie reviews positively.

Defaults everywhere: ``TextGen-v0``'s embedded LM, human-written review openings and the sentiment
reward model. After training, :func:`agents.evaluate_against_reference` samples the pretrained
reference and the trained policy on the same held-out prompts and prints a before/after table:
reward, KL to the reference (nats per episode), perplexity of the completions under the reference,
distinct-1/2 and length; the table and samples also go to TensorBoard (text tab). The run then states
whether reward rose while KL and perplexity stayed within bounds: KL per episode at most
``--max-kl`` (default: twice the KL controller's target) and perplexity under the reference at
most ``--max-perplexity-ratio`` times the reference's own (default 1.5)::

    python examples/train_sentiment.py                 # ~11 min on a 2-core CPU
    python examples/train_sentiment.py --lora-r 16 --learning-rate 1e-4   # LoRA adapters on q_proj, v_proj
    torchrun --standalone --nproc-per-node 2 examples/train_sentiment.py   # data-parallel, 2 ranks (agents.data_parallel)
    tensorboard --logdir runs/
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

import textgym  # noqa: F401  (registers TextGen-v0)
from agents import (AdaptiveKLController, KLPenaltyCallback, SampleTextCallback, TransformerPolicy, data_parallel,
                    evaluate_against_reference, local_device, text_ppo_kwargs)
from agents.distributed.collectives import rank, world_size
from agents.training.evaluation import write_summary


def check_bounds(results: dict, max_kl: float, max_perplexity_ratio: float) -> bool:
    """Print whether reward rose while KL and perplexity stayed within the stated bounds; True if all held."""
    reference, trained = results["reference"], results["trained"]
    gain = trained.reward_mean - reference.reward_mean
    gain_se = (trained.reward_sem ** 2 + reference.reward_sem ** 2) ** 0.5
    ratio = trained.perplexity / reference.perplexity
    checks = [
        (gain > 0, f"reward rose by {gain:+.3f} (± {gain_se:.3f} s.e.; "
                   f"{'more' if gain > 2 * gain_se else 'less'} than 2 s.e.)"),
        (trained.kl_mean <= max_kl, f"KL to the reference {trained.kl_mean:.2f} nats per episode (bound {max_kl:g})"),
        (ratio <= max_perplexity_ratio, f"perplexity under the reference {reference.perplexity:.2f} -> "
                                        f"{trained.perplexity:.2f}, x{ratio:.2f} (bound x{max_perplexity_ratio:g})"),
    ]
    print()
    for ok, text in checks:
        print(f"{'ok     ' if ok else 'WARNING'} {text}")
    return all(ok for ok, _ in checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=6144, help="environment steps (= generated tokens)")
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--n-steps", type=int, default=32, help="steps per env per rollout")
    parser.add_argument("--eval-episodes", type=int, default=128)
    parser.add_argument("--kl-coef", type=float, default=0.05, help="initial KL coefficient beta; 0 disables the penalty")
    parser.add_argument("--kl-target", type=float, default=4.0, help="target KL per episode (nats) of the adaptive controller")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per machine, shared by its ranks under torchrun (on 2 cores, 2 gave 1.5x the update throughput of 1)")
    parser.add_argument("--max-kl", type=float, default=None,
                        help="bound on the held-out KL to the reference, nats per episode (default: 2 x --kl-target)")
    parser.add_argument("--max-perplexity-ratio", type=float, default=1.5,
                        help="bound on trained / reference perplexity of the completions under the reference")
    parser.add_argument("--lora-r", type=int, default=0,
                        help="LoRA rank on q_proj and v_proj (alpha = 2 r); 0: fine-tune all weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/")
    parser.add_argument("--save", default=None, help="path to save the trained model (SB3 zip)")
    parser.add_argument("--results-json", default=None,
                        help="write the held-out figures, the last rollout's KL and the wall times to this JSON file")
    args = parser.parse_args()

    threads = max(1, args.threads // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(threads)
    start = time.perf_counter()
    env_kwargs = dict(max_new_tokens=args.max_new_tokens)
    train_env = make_vec_env("TextGen-v0", n_envs=args.n_envs, seed=args.seed, env_kwargs=env_kwargs)
    lora = (dict(lora_config=dict(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=["q_proj", "v_proj"]))
            if args.lora_r else {})
    # Under torchrun, data_parallel makes this one DD-PPO run over the ranks; with python it changes nothing.
    model = data_parallel(PPO(TransformerPolicy, train_env, seed=args.seed, verbose=1, device=local_device(),
                              tensorboard_log=args.tensorboard_log,
                              **text_ppo_kwargs(learning_rate=args.learning_rate, n_steps=args.n_steps, policy_kwargs=lora)))

    # Ziegler et al. (2019): penalise each token's log-ratio to the frozen starting model.
    kl = KLPenaltyCallback(AdaptiveKLController(args.kl_coef, target=args.kl_target)) if args.kl_coef > 0 else None
    samples = SampleTextCallback(n_samples=4)  # a few completions, 4 times per run, to TensorBoard and here
    model.learn(total_timesteps=args.timesteps, progress_bar=True, tb_log_name="sentiment",
                callback=[c for c in (kl, samples) if c is not None])
    train_seconds = time.perf_counter() - start
    if kl is not None and rank() == 0:
        print(f"\nlast rollout: KL to the reference {kl.stats.get('kl/episode_kl', float('nan')):.2f} nats per episode, "
              f"beta {kl.stats['kl/coef']:.4f}, score {kl.stats.get('kl/score', float('nan')):+.3f}")

    # Held-out prompts; the pretrained reference ("before") and the trained policy ("after") see the same ones.
    # Every rank evaluates its share of the episodes; rank 0 prints the table of all of them.
    if rank() == 0:
        print("\nheld-out prompts: 'reference' = the pretrained model (before training), 'trained' = after")
    held_out = make_vec_env("TextGen-v0", n_envs=args.n_envs, env_kwargs=dict(env_kwargs, prompts="movie_reviews:test"))
    results = evaluate_against_reference(model, held_out, n_episodes=args.eval_episodes, seed=10_000 + args.seed,
                                         kv_cache=True, tensorboard_log=model.logger.get_dir(), tag="heldout",
                                         step=model.num_timesteps)
    if rank() == 0:
        check_bounds(results, max_kl=2 * args.kl_target if args.max_kl is None else args.max_kl,
                     max_perplexity_ratio=args.max_perplexity_ratio)
        print(f"\nwall time {time.perf_counter() - start:.0f} s for {args.timesteps} training steps "
              f"({args.timesteps // args.max_new_tokens} or more episodes), torch threads {threads} per rank")
    if args.results_json and rank() == 0:
        write_summary(args.results_json, results, demo="sentiment", seed=args.seed, timesteps=args.timesteps,
                      world_size=world_size(), threads=threads, train_seconds=train_seconds,
                      wall_seconds=time.perf_counter() - start, last_rollout={k: float(v) for k, v in (kl.stats if kl is not None else {}).items()})
    if args.save:
        model.save(args.save)  # rank 0 alone writes in a data-parallel run


if __name__ == "__main__":
    main()
