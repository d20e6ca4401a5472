"""Checkpoint sizes on the default model: full fine-tuning vs LoRA, with and without optimizer state.

    python benchmarks/checkpoint_size.py     # SmolLM2-135M, about 2 minutes on 2 cores

For each setting it trains one small PPO update (so that Adam's moment estimates exist, as in any
checkpoint taken during training), then writes ``model.save`` (SB3's zip: weights, optimizer
state, settings; what ``PPO.load`` resumes from) and ``model.policy.save`` (weights and constructor
arguments only: what :class:`agents.RollingCheckpointCallback` writes with ``inference_only=True``,
loaded by ``TransformerPolicy.load``), and prints their sizes and write times as a table.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def measure(lora: bool, tmp: Path) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, text_ppo_kwargs

    policy_kwargs = dict(lora_config=dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])) if lora else {}
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0,
                       env_kwargs=dict(max_new_tokens=4, reward_model=lambda p, c: [0.0] * len(c)))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=4, batch_size=8, n_epochs=1,
                                                                   policy_kwargs=policy_kwargs))
    model.learn(8)
    result = {"trainable": sum(p.numel() for p in model.policy.parameters() if p.requires_grad)}
    for kind, save in (("zip", lambda path: model.save(path)), ("policy", lambda path: model.policy.save(path))):
        path = tmp / f"{'lora' if lora else 'full'}_{kind}"
        start = time.perf_counter()
        save(path)
        path = path.with_suffix(".zip") if kind == "zip" else path
        result[kind] = (path.stat().st_size / 2**20, time.perf_counter() - start)
    return result


def main() -> None:
    torch.set_num_threads(2)
    print("Checkpoint sizes, SmolLM2-135M (134.5M parameters, float32)\n")
    print("| setting | trainable parameters | model.save zip (MiB, s) | policy only, no optimizer (MiB, s) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for lora in (False, True):
            r = measure(lora, Path(tmp))
            name = "LoRA r=16 on q_proj, v_proj" if lora else "full fine-tuning"
            print(f"| {name} | {r['trainable']:,} | {r['zip'][0]:,.0f} ({r['zip'][1]:.1f} s) | "
                  f"{r['policy'][0]:,.0f} ({r['policy'][1]:.1f} s) |", flush=True)


if __name__ == "__main__":
    main()
