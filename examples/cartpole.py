"""Classic-control sanity baseline: the same upstream SB3 PPO on CartPole-v1.

Hyperparameters are rl-baselines3-zoo's, read from the installed ``rl_zoo3`` package
(``hyperparams/ppo.yml``, CartPole-v1, via :func:`agents.training.zoo.zoo_hyperparams`); the zoo's benchmark
reports 500.0 +/- 0.0 after 1e5 steps::

    python examples/cartpole.py            # ~2-4 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from agents.training.zoo import zoo_hyperparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a 64-unit MLP: more threads only add overhead
    start = time.perf_counter()
    zoo = zoo_hyperparams("CartPole-v1")  # n_envs 8, n_timesteps 1e5, MlpPolicy, lin_ schedules, ...
    n_envs, policy = zoo.pop("n_envs"), zoo.pop("policy")
    zoo.pop("n_timesteps")
    env = make_vec_env("CartPole-v1", n_envs=n_envs, seed=args.seed)
    model = PPO(policy, env, seed=args.seed, tensorboard_log=args.tensorboard_log, **zoo)
    model.learn(total_timesteps=args.timesteps, tb_log_name="cartpole")
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1000)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"CartPole-v1 PPO, {args.timesteps} steps: mean reward {mean:.1f} +/- {std:.1f} over 10 episodes "
          f"(rl-zoo: 500.0 +/- 0.0), {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
