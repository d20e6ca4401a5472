"""Checkpoint sizes on the default model: full fine-tuning vs LoRA, with and without optimizer state.

    python benchmarks/checkpoint_size.py     # SmolLM2-135M, about 2 minutes on 2 cores

For each setting it trains one small PPO update (so that Adam's moment estimates exist, as in any
checkpoint taken during training), then writes ``model.save`` (SB3's zip: weights, optimizer
state, settings; what ``PPO.load`` resumes from), ``model.policy.save`` (weights and constructor
arguments only: what :class:`agents.RollingCheckpointCallback` writes with ``inference_only=True``,
loaded by ``TransformerPolicy.load``) and, for LoRA, :func:`agents.save_adapters` (adapters, value
head and constructor arguments, no frozen base weights: ``adapters_only=True``, loaded by
:func:`agents.load_adapters`), and prints their sizes (a folder's: the sum of its files) and write
times as a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def measure(lora: bool, tmp: Path) -> dict:
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401
    from agents import TransformerPolicy, save_adapters, text_ppo_kwargs

    policy_kwargs = dict(lora_config=dict(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])) if lora else {}
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0,
                       env_kwargs=dict(max_new_tokens=4, reward_model=lambda p, c: [0.0] * len(c)))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=4, batch_size=8, n_epochs=1,
                                                                   policy_kwargs=policy_kwargs))
    model.learn(8)
    result = {"trainable": sum(p.numel() for p in model.policy.parameters() if p.requires_grad)}
    savers = {"zip": lambda path: model.save(path), "policy": lambda path: model.policy.save(path)}
    if lora:
        savers["adapters"] = lambda path: save_adapters(model.policy, path)
    for kind, save in savers.items():
        path = tmp / f"{'lora' if lora else 'full'}_{kind}"
        start = time.perf_counter()
        save(path)
        seconds = time.perf_counter() - start
        path = path.with_suffix(".zip") if kind == "zip" else path
        result[kind] = (size_mib(path), seconds)
    return result


def size_mib(path: Path) -> float:
    """Size of a file, or of every file in a folder, in MiB."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    return sum(p.stat().st_size for p in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the write times depend on them)")
    torch.set_num_threads(parser.parse_args().threads)
    print("Checkpoint sizes, SmolLM2-135M (134.5M parameters, float32)\n")
    print("| setting | trainable parameters | model.save zip (MiB, s) | policy only, no optimizer (MiB, s) "
          "| adapters only (MiB, s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for lora in (False, True):
            r = measure(lora, Path(tmp))
            name = "LoRA r=16 on q_proj, v_proj" if lora else "full fine-tuning"
            adapters = f"{r['adapters'][0]:,.1f} ({r['adapters'][1]:.2f} s)" if lora else "n/a"
            print(f"| {name} | {r['trainable']:,} | {r['zip'][0]:,.0f} ({r['zip'][1]:.1f} s) | "
                  f"{r['policy'][0]:,.0f} ({r['policy'][1]:.1f} s) | {adapters} |", flush=True)


if __name__ == "__main__":
    main()
