"""SampleTextCallback: which rollouts are sampled, what the table holds, TensorBoard's text tab."""

from __future__ import annotations

import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import SampleTextCallback, TransformerPolicy, text_ppo_kwargs
from agents.training.callbacks import samples_table


def test_samples_table_escapes_and_lists_every_component():
    infos = [{"prompt": "a|b", "completion": "one\ntwo", "reward_components": {"score": 1.0, "correct": 1.0}},
             {"prompt": "c", "completion": "", "reward_components": {"score": -0.5}}]
    assert samples_table(infos).splitlines() == [
        "| prompt | completion | score | correct |",
        "|---|---|---|---|",
        "| a\\|b | one\\ntwo | +1.000 | +1.000 |",
        "| c |  | -0.500 | |",
    ]


def test_logs_evenly_spaced_rollouts_to_tensorboard_and_console(tiny_env_kwargs, tmp_path, capsys):
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=tiny_env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, tensorboard_log=str(tmp_path),
                **text_ppo_kwargs(n_steps=8, batch_size=16, n_epochs=1))
    callback = SampleTextCallback(n_samples=3, n_logs=4)
    model.learn(8 * 16, callback=callback, tb_log_name="samples")  # 8 rollouts of 16 steps: rollouts 0, 2, 4, 6
    assert callback.rollouts == 8 and len(callback.tables) == 4
    assert all(len(table.splitlines()) == 2 + 3 for table in callback.tables)
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("samples at")] == [
        f"samples at {steps} steps:" for steps in (16, 48, 80, 112)]

    events = EventAccumulator(str(next(tmp_path.glob("samples_*"))), size_guidance={"tensors": 0})
    events.Reload()
    logged = events.Tensors("samples/text/text_summary")
    assert [e.step for e in logged] == [16, 48, 80, 112]
    assert logged[-1].tensor_proto.string_val[0].decode() == callback.tables[-1]


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="n_samples"):
        SampleTextCallback(n_samples=0)
    with pytest.raises(ValueError, match="every"):
        SampleTextCallback(every=0)


class Snapshot(BaseCallback):
    """The policy's weights at the last step (a checkpoint saved during a rollout predates its update)."""

    def _on_step(self) -> bool:
        self.state = {k: v.clone() for k, v in self.model.policy.state_dict().items()}
        return True


def test_rolling_checkpoints_keep_the_last_k(tiny_env_kwargs, tmp_path):
    from agents import RollingCheckpointCallback, latest_checkpoint

    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=tiny_env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=16, n_epochs=1))
    (tmp_path / "rl_model_final.zip").write_bytes(b"not ours")  # no step count: never pruned
    callback, snapshot = RollingCheckpointCallback(save_freq=8, save_path=str(tmp_path), keep_last=2), Snapshot()
    model.learn(6 * 16, callback=[callback, snapshot])  # one save per rollout: 16, 32, ..., 96 steps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rl_model_80_steps.zip", "rl_model_96_steps.zip",
                                                          "rl_model_final.zip", "rl_model_manifest_80_steps.json",
                                                          "rl_model_manifest_96_steps.json"]
    assert latest_checkpoint(tmp_path).model == tmp_path / "rl_model_96_steps.zip"
    loaded = PPO.load(tmp_path / "rl_model_96_steps.zip", env=env)
    for name, value in snapshot.state.items():
        assert torch.equal(loaded.policy.state_dict()[name], value), name


def train_with_one_checkpoint(env_kwargs, save_path, lora: bool, **checkpoint_kwargs):
    """32 PPO steps on 2 tiny envs (LoRA on ``c_attn`` if ``lora``) with a ``RollingCheckpointCallback``
    saving every 8 steps and keeping the last; returns ``(env, model, Snapshot of the last step)``."""
    from agents import RollingCheckpointCallback

    policy_kwargs = dict(lora_config=dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True)) if lora else {}
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=env_kwargs)
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=16, n_epochs=1, learning_rate=1e-2,
                                                                   policy_kwargs=policy_kwargs))
    callback = RollingCheckpointCallback(save_freq=8, save_path=str(save_path), keep_last=1, **checkpoint_kwargs)
    snapshot = Snapshot()
    model.learn(32, callback=[callback, snapshot])
    return env, model, snapshot


@pytest.mark.parametrize("lora", [False, True])
def test_inference_only_checkpoint_has_no_optimizer_and_reloads_the_policy(tiny_env_kwargs, tmp_path, lora):
    env, model, snapshot = train_with_one_checkpoint(tiny_env_kwargs, tmp_path / "ckpt", lora, inference_only=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["rl_model_manifest_32_steps.json",
                                                                     "rl_model_policy_32_steps.pth"]
    model.save(tmp_path / "full.zip")
    assert (tmp_path / "ckpt" / "rl_model_policy_32_steps.pth").stat().st_size < (tmp_path / "full.zip").stat().st_size
    policy = TransformerPolicy.load(tmp_path / "ckpt" / "rl_model_policy_32_steps.pth")
    assert (policy.peft_model is not None) == lora
    for name, value in snapshot.state.items():
        assert torch.equal(policy.state_dict()[name], value), name
    model.policy.load_state_dict(snapshot.state)  # the same weights in the trained model: the same policy
    obs = {k: torch.as_tensor(v) for k, v in env.reset().items()}
    with torch.no_grad():
        torch.testing.assert_close(policy.get_distribution(obs).distribution.logits,
                                   model.policy.get_distribution(obs).distribution.logits, rtol=0, atol=0)


def test_adapters_only_checkpoints_are_small_folders_that_reload_the_policy(tiny_env_kwargs, tmp_path):
    from agents import RollingCheckpointCallback, load_adapters

    env, model, snapshot = train_with_one_checkpoint(tiny_env_kwargs, tmp_path / "ckpt", lora=True, adapters_only=True)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [  # older folders pruned
        "rl_model_adapters_32_steps", "rl_model_manifest_32_steps.json"]
    policy = load_adapters(tmp_path / "ckpt" / "rl_model_adapters_32_steps")
    model.policy.load_state_dict(snapshot.state)  # the weights at the save (a rollout step, before the last update)
    obs = {k: torch.as_tensor(v) for k, v in env.reset().items()}
    with torch.no_grad():
        torch.testing.assert_close(policy.get_distribution(obs).distribution.logits,
                                   model.policy.get_distribution(obs).distribution.logits, rtol=0, atol=0)

    full = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=16, n_epochs=1))
    with pytest.raises(ValueError, match="needs a LoRA policy"):
        full.learn(16, callback=RollingCheckpointCallback(8, str(tmp_path / "x"), adapters_only=True))


def test_checkpoint_kinds_are_exclusive():
    from agents import RollingCheckpointCallback

    with pytest.raises(ValueError, match="pass one of them"):
        RollingCheckpointCallback(8, "x", inference_only=True, adapters_only=True)
    with pytest.raises(ValueError, match="save_vecnormalize"):
        RollingCheckpointCallback(8, "x", training_state=True, save_vecnormalize=True)
