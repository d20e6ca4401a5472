"""SampleTextCallback: which rollouts are sampled, what the table holds, TensorBoard's text tab."""

from __future__ import annotations

import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents import SampleTextCallback, TransformerPolicy, text_ppo_kwargs
from agents.callbacks import samples_table


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
