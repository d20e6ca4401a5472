"""One rank of the data-parallel tests (``tests/test_data_parallel.py`` launches it with ``torchrun``).

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py SCENARIO OUT TINY_LM``
runs a scenario on every rank and writes ``OUT/<scenario>-rank<r>.json`` (digests, figures) for
the test to compare. Tiny random models on CPU, one torch thread per rank.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch as th
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

import agents
from agents.training.distributed import DEFAULT_TIMEOUT_S
import textgym  # noqa: F401  (registers TextGen-v0)
from agents.distributed import collectives
from textgym.tasks.synthetic import KeywordReward

th.set_num_threads(1)

PROMPTS = ["the movie was", "a film is", "one two", "the film was very"]
N_ENVS = 2
N_STEPS = 8
MAX_GRAD_NORM = 1e-3


def env_kwargs(tiny_lm: str, **overrides) -> dict:
    return {"model_name_or_path": tiny_lm, "prompts": PROMPTS, "reward_model": KeywordReward(slots=4, keyword="good"),
            "max_prompt_tokens": 5, "max_new_tokens": 4, **overrides}


def digest(tensors) -> str:
    """SHA-256 of tensors' bytes, in order (bit-identical weights give identical digests)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().view(-1).view(th.uint8).numpy().tobytes() if t.dtype == th.bfloat16
                 else t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def state_digests(model) -> dict:
    """Digests of the policy's weights and of its optimizer's (and value optimizer's) tensors."""
    weights = digest(model.policy.state_dict().values())

    def tensors(state):
        if isinstance(state, th.Tensor):
            yield state
        elif isinstance(state, dict):
            for key in sorted(state, key=str):
                yield from tensors(state[key])
        elif isinstance(state, (list, tuple)):
            for item in state:
                yield from tensors(item)

    optimizer = digest(tensors(model.policy.optimizer.state_dict()))
    return {"weights": weights, "optimizer": optimizer}


def variants(tiny_lm: str) -> dict:
    """Builders of every supported setting, keyed by name: each returns (model, learn kwargs)."""
    from textgym.vec_env import GroupedPrompts

    def text_env(**overrides):
        return make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm, **overrides))

    small = dict(n_steps=N_STEPS, batch_size=8, n_epochs=2, learning_rate=1e-3, seed=0)

    def ppo_full():
        model = PPO(agents.TransformerPolicy, text_env(), **agents.text_ppo_kwargs(**small, target_kl=0.02))
        return model, dict(callback=agents.KLPenaltyCallback(kl_coef=agents.AdaptiveKLController(init_kl_coef=0.1, target=1.0)))

    def ppo_lora():
        lora = dict(lora_config=dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
        return PPO(agents.TransformerPolicy, text_env(), **agents.text_ppo_kwargs(**small, policy_kwargs=lora)), {}

    def ppo_bf16():
        return PPO(agents.TransformerPolicy, text_env(), **agents.text_ppo_kwargs(**small, policy_kwargs=dict(dtype="bfloat16"))), {}

    def rloo():
        env = GroupedPrompts(make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm)), N_ENVS)
        return PPO(agents.TransformerPolicy, env, **agents.group_ppo_kwargs("rloo", **small)), {}

    def a2c():
        return A2C(agents.TransformerPolicy, text_env(), n_steps=N_STEPS, learning_rate=1e-3, seed=0,
                   policy_kwargs=dict(share_prefix_forward=True)), {}

    def nlpo():
        from sb3_contrib import MaskablePPO
        model = MaskablePPO(agents.MaskableTransformerPolicy, text_env(),
                            **agents.nlpo_kwargs(top_p=0.9, target_update_iterations=2, **small))
        return model, dict(callback=agents.NLPOCallback(), use_masking=False)

    def early_stop():  # a target_kl that the second epoch's first minibatch exceeds
        return PPO(agents.TransformerPolicy, text_env(), **agents.text_ppo_kwargs(**{**small, "n_epochs": 4, "learning_rate": 3e-2},
                                                                              target_kl=1e-4)), {}

    def unequal_minibatches():  # rank 0: 4 episodes of 4 steps (2 minibatches of 8); rank 1: 16 of 1 (3 of 6)
        length = 4 if os.environ["RANK"] == "0" else 1
        env = text_env(eos_token_id=None, max_new_tokens=length)
        return PPO(agents.TransformerPolicy, env, **agents.text_ppo_kwargs(**{**small, "batch_size": 6})), {}

    def cartpole():
        env = make_vec_env("CartPole-v1", n_envs=N_ENVS, seed=0)
        return PPO("MlpPolicy", env, n_steps=32, batch_size=16, n_epochs=2, seed=0), {}

    return dict(ppo_full=ppo_full, ppo_lora=ppo_lora, ppo_bf16=ppo_bf16, rloo=rloo, a2c=a2c, nlpo=nlpo,
                early_stop=early_stop, unequal_minibatches=unequal_minibatches, cartpole=cartpole)


class FirstObservations(BaseCallback):
    """Records the first observation the envs gave (the seeds' effect) and the initial weights' digest."""

    def _on_training_start(self) -> None:
        obs = self.model._last_obs
        first = obs["input_ids"] if isinstance(obs, dict) else obs
        self.first_obs = np.asarray(first).tolist()
        self.initial = digest(self.model.policy.state_dict().values())
        self.env_seeds = [int(seed) for seed in self.model.env.get_attr("np_random_seed")]

    def _on_step(self) -> bool:
        return True


def same_weights(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Train each variant for 3 updates (2 ranks x N_ENVS envs x N_STEPS steps each) and report digests."""
    results = {}
    agreements: list[tuple[int, int]] = []
    agree_min = collectives.agree_min

    def recording_agree_min(value: int) -> int:
        agreements.append((value, agree_min(value)))
        return agreements[-1][1]

    collectives.agree_min = recording_agree_min  # the buffers call it through the module
    for name in names or variants(tiny_lm):
        agreements.clear()
        model, learn_kwargs = variants(tiny_lm)[name]()
        agents.data_parallel(model)
        first = FirstObservations()
        callbacks = [first, *([learn_kwargs.pop("callback")] if "callback" in learn_kwargs else [])]
        n_steps = model.n_steps * model.n_envs
        model.learn(3 * n_steps * collectives.world_size(), callback=callbacks, **learn_kwargs)
        results[name] = {**state_digests(model), "initial": first.initial, "first_obs": first.first_obs, "env_seeds": first.env_seeds,
                         "num_timesteps": model.num_timesteps, "n_updates": getattr(model, "_n_updates", None),
                         "minibatch_counts": list(agreements)}
        if isinstance(callbacks[-1], agents.KLPenaltyCallback):
            results[name]["kl_coef"] = callbacks[-1].controller.value
        if name == "nlpo":
            results[name]["masking_refreshes"] = list(model.policy.masking_refreshes)
            results[name]["masking_lm"] = digest(model.policy.masking_lm_own_tensors().values())
    return results


def union(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """One update on 2 ranks against one single-process update over the union of their rollouts.

    Fixed-length episodes (no EOS), one minibatch per rank (batch_size = its 16 transitions), one
    epoch, no advantage normalisation: the single-process loss over the union is the mean of the
    ranks' losses, so its gradient is their average. The gradient norm is clipped (``MAX_GRAD_NORM``
    is far below it), so the comparison also shows that clipping sees the averaged gradient.
    """
    from stable_baselines3.common.logger import configure

    kwargs = agents.text_ppo_kwargs(n_steps=N_STEPS, batch_size=N_STEPS * N_ENVS, n_epochs=1, learning_rate=1e-3,
                                    normalize_advantage=False, max_grad_norm=MAX_GRAD_NORM, seed=0)
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm, eos_token_id=None))
    model = agents.data_parallel(PPO(agents.TransformerPolicy, env, **kwargs))
    capture = CaptureRollout()
    model.learn(N_STEPS * N_ENVS * collectives.world_size(), callback=capture)
    rollouts = collectives.all_gather_object(capture.arrays)

    world = collectives.world_size()
    single_env = make_vec_env("TextGen-v0", n_envs=N_ENVS * world, seed=0, env_kwargs=env_kwargs(tiny_lm, eos_token_id=None))
    single = PPO(agents.TransformerPolicy, single_env, **{**kwargs, "batch_size": N_STEPS * N_ENVS * world})
    single.policy.load_state_dict(capture.initial)
    single.set_logger(configure(None, []))
    buffer = single.rollout_buffer
    for name in rollouts[0]:
        union_array = np.concatenate([rollout[name] for rollout in rollouts], axis=1)  # (n_steps, envs, ...)
        if name.startswith("obs."):
            buffer.observations[name[4:]] = union_array.astype(buffer.observations[name[4:]].dtype)
        else:
            setattr(buffer, name, union_array)
    buffer.full, buffer.pos, buffer.generator_ready = True, buffer.buffer_size, False
    single.train()

    def max_difference(a, b):
        return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))

    return {"weights": max_difference(model.policy.state_dict().values(), single.policy.state_dict().values()),
            "changed": max_difference(model.policy.state_dict().values(), capture.initial.values()),
            "grad_norm_after_clipping": float(th.nn.utils.get_total_norm([p.grad for p in single.policy.parameters()
                                                                           if p.grad is not None]))}


class CaptureRollout(BaseCallback):
    """Keeps the initial weights and the rollout buffer's arrays (with GAE), before the update reads them."""

    def _on_training_start(self) -> None:
        self.initial = {k: v.clone() for k, v in self.model.policy.state_dict().items()}

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        buffer = self.model.rollout_buffer
        self.arrays = {f"obs.{key}": value.copy() for key, value in buffer.observations.items()}
        for name in ("actions", "rewards", "returns", "advantages", "values", "log_probs", "episode_starts"):
            self.arrays[name] = getattr(buffer, name).copy()


class FailOnRank(BaseCallback):
    """Raises (or hangs for ``hang_s``) on rank ``rank`` at its second rollout."""

    def __init__(self, rank: int, hang_s: float = 0.0):
        super().__init__()
        self.fail_rank, self.hang_s, self.rollouts = rank, hang_s, 0

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self.rollouts += 1
        if self.rollouts == 2 and collectives.rank() == self.fail_rank:
            if self.hang_s:
                import time
                time.sleep(self.hang_s)
            raise RuntimeError(f"injected failure on rank {self.fail_rank}")


def fault(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Rank 1 raises (``fault raise``) or stops answering for 120 s (``fault hang``, 5 s collective timeout)."""
    hang = names == ["hang"]
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm))
    model = PPO(agents.TransformerPolicy, env, **agents.text_ppo_kwargs(n_steps=N_STEPS, batch_size=8, n_epochs=1, seed=0))
    agents.data_parallel(model, timeout_s=5 if hang else DEFAULT_TIMEOUT_S)
    model.learn(10 * N_STEPS * N_ENVS * collectives.world_size(),
                callback=[agents.KLPenaltyCallback(0.1), FailOnRank(1, hang_s=120 if hang else 0)])
    return {}


def mismatch(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Rank 1 builds its model with 3 envs instead of 2: data_parallel must refuse on every rank."""
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS + int(os.environ["RANK"]), seed=0, env_kwargs=env_kwargs(tiny_lm))
    agents.data_parallel(PPO(agents.TransformerPolicy, env, **agents.text_ppo_kwargs(n_steps=N_STEPS, batch_size=8)))
    return {}


def logging(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Console table and TensorBoard from rank 0 only; ``model.save`` writes on rank 0 only."""
    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm))
    model = PPO(agents.TransformerPolicy, env, verbose=1, tensorboard_log=str(out / "tb"),
                **agents.text_ppo_kwargs(n_steps=N_STEPS, batch_size=8, n_epochs=1, seed=0))
    agents.data_parallel(model)
    model.learn(2 * N_STEPS * N_ENVS * collectives.world_size(), tb_log_name="dp",
                callback=agents.KLPenaltyCallback(0.1))
    model.save(out / f"model-rank{collectives.rank()}")
    return {"num_timesteps": model.num_timesteps}


def keyword(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """The synthetic keyword task with its recommended settings and budget (6,000 steps in all), 2 envs
    per rank; rank 0 evaluates 40 sampled episodes on held-out seeds."""
    from stable_baselines3.common.evaluation import evaluate_policy

    from textgym.tasks.synthetic import TASKS, register_synthetic_tasks

    register_synthetic_tasks()
    seed, task = int(names[0]), TASKS["keyword"]
    env = make_vec_env(task.gym_id, n_envs=2, seed=seed)
    model = agents.data_parallel(PPO(agents.TransformerPolicy, env, seed=seed, **agents.text_ppo_kwargs(**task.ppo_kwargs)))
    model.learn(total_timesteps=task.total_timesteps)
    result = {"num_timesteps": model.num_timesteps, "weights": digest(model.policy.state_dict().values())}
    if collectives.rank() == 0:
        eval_env = make_vec_env(task.gym_id, n_envs=4, seed=seed + 1000)
        result["mean_reward"] = evaluate_policy(model, eval_env, n_eval_episodes=40, deterministic=False)[0]
    return result


EVAL_ENVS, EVAL_EPISODES, EVAL_SEED = 3, 7, 5


def eval_env(tiny_lm: str):
    """The held-out env of the evaluation scenario: 3 envs (not a multiple of 2 ranks), 7 episodes."""
    return make_vec_env("TextGen-v0", n_envs=EVAL_ENVS, env_kwargs=env_kwargs(tiny_lm))


def evaluation_summary(results: dict) -> dict:
    """What the test compares of :func:`agents.evaluate_against_reference`'s results."""
    return {name: {"figures": [r.n_episodes, r.reward_mean, r.kl_mean, r.perplexity, r.distinct_1, r.distinct_2,
                               r.length_mean],
                   "episodes": [[e.prompt, e.completion, e.tokens, e.log_probs.tolist(), e.ref_log_probs.tolist()]
                                for e in r.episodes]}
            for name, r in results.items()}


def evaluation(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Two updates of 2 ranks, then a sharded held-out evaluation, greedy and sampled; rank 0 saves
    the model for the test's single-process evaluation of the same episodes. Also: an env the
    evaluation cannot shard is refused."""
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class Opaque(VecEnvWrapper):
        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            return self.venv.step_wait()

    env = make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm))
    model = agents.data_parallel(PPO(agents.TransformerPolicy, env, **agents.text_ppo_kwargs(
        n_steps=N_STEPS, batch_size=8, n_epochs=1, learning_rate=1e-2, seed=0)))
    model.learn(2 * N_STEPS * N_ENVS * collectives.world_size())
    model.save(out / "evaluated")
    result = {}
    for deterministic in (True, False):
        results = agents.evaluate_against_reference(model, eval_env(tiny_lm), n_episodes=EVAL_EPISODES,
                                                    seed=EVAL_SEED, deterministic=deterministic, kv_cache=True)
        result["greedy" if deterministic else "sampled"] = evaluation_summary(results)
    try:
        agents.evaluate_against_reference(model, Opaque(eval_env(tiny_lm)), n_episodes=2, verbose=False)
    except ValueError as error:
        result["refused"] = str(error)
    return result


def resume(out: Path, tiny_lm: str, names: list[str]) -> dict:
    """Two iterations of 2 ranks with a training-state checkpoint after the first (RLOO buffers, so
    each rank also carries returns of unfinished episodes); then the checkpoint is resumed with
    ``agents.resume_latest`` after scrambling every generator, and trained for the second iteration."""
    import random

    def text_env():
        return make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=0, env_kwargs=env_kwargs(tiny_lm, max_new_tokens=3))

    def kl():
        return agents.KLPenaltyCallback(kl_coef=agents.AdaptiveKLController(init_kl_coef=0.1, target=1.0))

    kwargs = agents.text_ppo_kwargs(n_steps=N_STEPS - 1, batch_size=7, n_epochs=2, learning_rate=1e-3, seed=0,
                                    rollout_buffer_class=agents.GroupRelativeRolloutBuffer)
    model = agents.data_parallel(PPO(agents.TransformerPolicy, text_env(), **kwargs))
    iteration = (N_STEPS - 1) * N_ENVS * collectives.world_size()  # the group is up once data_parallel returns
    checkpoints = agents.RollingCheckpointCallback(save_freq=N_STEPS - 1, save_path=str(out / "checkpoints"),
                                                   training_state=True)
    model.learn(2 * iteration, callback=[kl(), checkpoints])
    carried = bool(np.any(model.rollout_buffer._carry_out))

    th.manual_seed(1234 + collectives.rank())
    np.random.seed(1234)
    random.seed(1234)
    resumed = agents.resume_latest(out / "checkpoints", text_env())
    resumed_at = resumed.num_timesteps
    resumed.learn(iteration, callback=kl(), reset_num_timesteps=False)
    return {"uninterrupted": state_digests(model), "resumed": state_digests(resumed), "resumed_at": resumed_at,
            "carried": carried, "data_parallel": isinstance(resumed, agents.training.distributed.DataParallelAlgorithm),
            "files": sorted(p.name for p in (out / "checkpoints").iterdir())}


def main() -> None:
    scenario, out, tiny_lm, *names = sys.argv[1:]
    out = Path(out)
    result = {"same_weights": same_weights, "union": union, "fault": fault, "logging": logging, "mismatch": mismatch,
              "keyword": keyword, "evaluation": evaluation, "resume": resume}[scenario](out, tiny_lm, names)
    result["rank"], result["world_size"] = collectives.rank(), collectives.world_size()
    (out / f"{scenario}-rank{collectives.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
