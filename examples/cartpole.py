"""Classic-control sanity baseline: the same upstream SB3 PPO on CartPole-v1.

Hyperparameters are rl-baselines3-zoo's (``hyperparams/ppo.yml``, CartPole-v1), whose benchmark
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
from stable_baselines3.common.utils import LinearSchedule


def linear(initial: float) -> LinearSchedule:
    """rl-zoo's ``lin_<value>`` schedule, ``initial * progress_remaining``, as SB3's ``LinearSchedule``."""
    return LinearSchedule(start=initial, end=0.0, end_fraction=1.0)


ZOO_CARTPOLE = dict(n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                    learning_rate=linear(1e-3), clip_range=linear(0.2))
"""rl-baselines3-zoo's PPO hyperparameters for CartPole-v1 (with ``n_envs=8``, ``n_timesteps=1e5``)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tensorboard-log", default="runs/")
    args = parser.parse_args()

    torch.set_num_threads(1)  # a 64-unit MLP: more threads only add overhead
    start = time.perf_counter()
    env = make_vec_env("CartPole-v1", n_envs=8, seed=args.seed)
    model = PPO("MlpPolicy", env, seed=args.seed, tensorboard_log=args.tensorboard_log, **ZOO_CARTPOLE)
    model.learn(total_timesteps=args.timesteps, tb_log_name="cartpole")
    eval_env = make_vec_env("CartPole-v1", n_envs=1, seed=args.seed + 1000)
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"CartPole-v1 PPO, {args.timesteps} steps: mean reward {mean:.1f} +/- {std:.1f} over 10 episodes "
          f"(rl-zoo: 500.0 +/- 0.0), {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
