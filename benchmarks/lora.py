"""Memory and time per PPO iteration, full fine-tuning vs LoRA adapters, with the KL penalty. Prints a markdown table.

Each setting runs in a fresh Python subprocess (so peak RSS, ``resource.getrusage(...).ru_maxrss``,
is that setting's alone): ``TextGen-v0`` with its defaults (SmolLM2-135M-Instruct, sentiment reward),
8 envs, 16 new tokens, :func:`agents.text_ppo_kwargs` defaults (256 transitions per iteration),
:class:`agents.KLPenaltyCallback` (beta 0.05). After ``--warmup`` iterations, ``--iterations``
iterations are timed and split into rollout (``collect_rollouts``), KL reference (the callback's
reference forward and GAE recomputation) and update (``PPO.train``). Full fine-tuning holds a
second LM as the KL reference and Adam state for every weight; LoRA holds neither (its reference is
the same LM with adapters disabled)::

    python benchmarks/lora.py                          # a few minutes on 2 cores
    python benchmarks/lora.py --iterations 2 --r 8
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = ("full", "lora")


def worker(args: argparse.Namespace) -> dict:
    """One setting in this process: build, train, time; return the figures (JSON-able)."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList
    from stable_baselines3.common.env_util import make_vec_env

    import textgym  # noqa: F401  (registers TextGen-v0)
    from agents import KLPenaltyCallback, TransformerPolicy, text_ppo_kwargs

    class Clock(BaseCallback):
        """Append ``(name, perf_counter())`` at rollout end (and, with ``start``, at rollout start)."""

        def __init__(self, marks: list, name: str, start: bool):
            super().__init__()
            self.marks, self.name, self.start = marks, name, start

        def _on_rollout_start(self) -> None:
            if self.start:
                self.marks.append(("rollout_start", time.perf_counter()))

        def _on_rollout_end(self) -> None:
            self.marks.append((self.name, time.perf_counter()))

        def _on_step(self) -> bool:
            return True

    torch.set_num_threads(args.threads)
    policy_kwargs = {}
    if args.setting == "lora":
        policy_kwargs["lora_config"] = dict(r=args.r, lora_alpha=2 * args.r, target_modules=args.target_modules)
    env = make_vec_env("TextGen-v0", n_envs=args.n_envs, seed=0, env_kwargs=dict(max_new_tokens=args.max_new_tokens))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(policy_kwargs=policy_kwargs))
    trainable = sum(p.numel() for p in model.policy.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.policy.parameters())
    marks: list[tuple[str, float]] = []
    kl = KLPenaltyCallback(0.05)
    callback = CallbackList([Clock(marks, "rollout_end", start=True), kl, Clock(marks, "kl_end", start=False)])
    iterations = args.warmup + args.iterations
    model.learn(iterations * model.n_steps * args.n_envs, callback=callback)
    marks.append(("rollout_start", time.perf_counter()))  # end of the last update
    times = {name: [t for n, t in marks if n == name] for name in ("rollout_start", "rollout_end", "kl_end")}
    split = {"rollout": [], "kl": [], "update": []}
    for k in range(args.warmup, iterations):
        split["rollout"].append(times["rollout_end"][k] - times["rollout_start"][k])
        split["kl"].append(times["kl_end"][k] - times["rollout_end"][k])
        split["update"].append(times["rollout_start"][k + 1] - times["kl_end"][k])
    return dict(setting=args.setting, trainable=trainable, total=total, second_lm=kl.reference is not None,
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                transitions=model.n_steps * args.n_envs, **{key: sum(v) / len(v) for key, v in split.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--iterations", type=int, default=3, help="timed PPO iterations (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (alpha = 2 r)")
    parser.add_argument("--target-modules", nargs="+", default=["q_proj", "v_proj"])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if args.setting:
        print(json.dumps(worker(args)))
        return

    rows = []
    for setting in args.settings:
        command = [sys.executable, __file__, "--setting", setting, "--iterations", str(args.iterations),
                   "--warmup", str(args.warmup), "--n-envs", str(args.n_envs), "--max-new-tokens", str(args.max_new_tokens),
                   "--r", str(args.r), "--threads", str(args.threads), "--target-modules", *args.target_modules]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{setting} failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    lora_name = f"LoRA r={args.r} on {', '.join(args.target_modules)}"
    print(f"\nSmolLM2-135M-Instruct, {args.n_envs} envs, {args.max_new_tokens} new tokens, text_ppo_kwargs() defaults "
          f"({rows[0]['transitions']} transitions per iteration), KL penalty beta 0.05; mean of {args.iterations} "
          f"iterations after {args.warmup} warm-up; torch threads {args.threads}. Run it alone: "
          "on 2 cores a second busy process makes multi-threaded torch many times slower.\n")
    print("| setting | trainable parameters | KL reference | peak RSS (MiB) | rollout (s/iter) | KL reference (s/iter) "
          "| update (s/iter) | total (s/iter) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        name = lora_name if row["setting"] == "lora" else "full fine-tuning"
        reference = "second LM" if row["second_lm"] else "adapters disabled"
        total = row["rollout"] + row["kl"] + row["update"]
        print(f"| {name} | {row['trainable']:,} of {row['total']:,} | {reference} | {row['peak_rss_mib']:,.0f} "
              f"| {row['rollout']:.1f} | {row['kl']:.1f} | {row['update']:.1f} | {total:.1f} |")


if __name__ == "__main__":
    main()
