"""rl-baselines3-zoo: textgym's yaml trains, checkpoints, logs, replays and tunes through ``python -m rl_zoo3.train``.

Every zoo run is a subprocess on one thread (``OMP_NUM_THREADS=1``, ``--num-threads 1``) in a tmp
dir, on the synthetic tasks' tiny LM, so no default asset is needed.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from stable_baselines3 import PPO

import textgym.hyperparams
from agents import TEXT_PPO_DEFAULTS, EpisodeRolloutBuffer, TransformerPolicy, text_ppo_kwargs
from agents.training.zoo import TEXT_PPO_SEARCH_SPACE, convert_text_ppo_params, install_text_sampler
from agents.training.zoo import main as zoo_replay
from textgym.tasks.synthetic import TASKS, tiny_lm_path

REPO = Path(__file__).resolve().parents[1]
YAML = REPO / "textgym" / "hyperparams" / "ppo.yml"
KEYWORD = "TextGen-Keyword-v0"


def zoo(module: str, *args: str, cwd: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` on one thread in ``cwd``; fail the test with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                            check=False, text=True, timeout=timeout)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.returncode == 0, f"{module} {' '.join(args)} failed:\n{output}"
    return result


def train_args(env_id: str, *extra: str, gym_packages: tuple[str, ...] = ("textgym",)) -> list[str]:
    return ["--algo", "ppo", "--env", env_id, "--gym-packages", *gym_packages, "-conf", str(YAML),
            "--num-threads", "1", "--seed", "0", *extra]


def test_yaml_entries_are_the_documented_settings():
    entries = textgym.hyperparams.load()
    assert textgym.hyperparams.hyperparams == entries and textgym.hyperparams.hyperparams is not entries
    text = entries["TextGen-v0"]
    for key, value in TEXT_PPO_DEFAULTS.items():
        if key == "rollout_buffer_class":  # the zoo cannot pass a class here; a callback installs it
            assert "agents.zoo.EpisodeRolloutBufferCallback" == text["callback"][0]
        elif key == "policy_kwargs":
            assert eval(text["policy_kwargs"]) == value
        else:
            assert text[key] == value and type(text[key]) is type(value), key
    assert text["n_envs"] == 8 and text["policy"] == "agents.TransformerPolicy"
    for task in TASKS.values():
        entry = entries[task.gym_id]
        expected = text_ppo_kwargs(**task.ppo_kwargs)
        for key, value in expected.items():
            if key == "policy_kwargs":
                assert eval(entry["policy_kwargs"]) == value
            elif key != "rollout_buffer_class":
                assert entry[key] == value and type(entry[key]) is type(value), (task.name, key)
        assert entry["n_timesteps"] == task.total_timesteps and entry["n_envs"] == 4
        assert entry["callback"][0] == "agents.zoo.EpisodeRolloutBufferCallback"


def test_train_writes_checkpoints_and_tensorboard_and_the_model_replays(tmp_path, capsys):
    result = zoo("rl_zoo3.train", *train_args(KEYWORD, "-n", "512", "--save-freq", "256", "--eval-freq", "512",
                                              "--eval-episodes", "4", "-f", "logs", "--tensorboard-log", "runs"),
                 cwd=tmp_path)
    run = tmp_path / "logs" / "ppo" / f"{KEYWORD}_1"
    for name in ("rl_model_256_steps.zip", "rl_model_512_steps.zip", f"{KEYWORD}.zip", "best_model.zip",
                 "evaluations.npz", f"{KEYWORD}/config.yml", f"{KEYWORD}/args.yml"):
        assert (run / name).is_file(), name
    assert list((tmp_path / "runs" / KEYWORD / "PPO_1").glob("events.out.tfevents.*"))
    assert "samples at 128 steps:" in result.stdout  # the yaml's SampleTextCallback ran

    model = PPO.load(run / f"{KEYWORD}.zip", device="cpu")
    assert isinstance(model.policy, TransformerPolicy)
    # Only the yaml's EpisodeRolloutBufferCallback sets this class: it ran before training.
    assert model.rollout_buffer_class is EpisodeRolloutBuffer and isinstance(model.rollout_buffer, EpisodeRolloutBuffer)
    assert (model.n_envs, model.n_steps, model.batch_size, model.normalize_advantage) == (4, 32, 32, False)

    capsys.readouterr()
    episodes = zoo_replay(["--env", KEYWORD, "-f", str(tmp_path / "logs"), "-n", "3", "--load-checkpoint", "256"])
    out = capsys.readouterr().out
    assert len(episodes) == 3 and "rl_model_256_steps.zip" in out and "| prompt | completion | score |" in out
    for episode in episodes:
        assert set(episode) == {"prompt", "completion", "reward", "reward_components"}
        assert f"| {episode['prompt']} |" in out and 0.0 <= episode["reward"] <= 1.0

    # The zoo's own replay asks for render_mode="human": the env prints each finished episode's text.
    enjoyed = zoo("rl_zoo3.enjoy", "--algo", "ppo", "--env", KEYWORD, "--gym-packages", "textgym", "-f", "logs",
                  "-n", "12", "--num-threads", "1", cwd=tmp_path)
    assert "Mean reward:" in enjoyed.stdout and "Episode Length 4" in enjoyed.stdout
    assert enjoyed.stdout.count("[reward ") == 3  # 12 steps: three 4-token episodes, each printed with its text


def test_text_entry_trains_with_kl_penalty_on_a_tiny_model(tmp_path):
    # TextGen-v0's entry (8 envs, adaptive KL, samples) with env kwargs that swap the default assets
    # for the tiny LM; --env-kwargs values are Python evaluated by the zoo (importlib is in scope).
    result = zoo("rl_zoo3.train", *train_args(
        "TextGen-v0", "-n", "256", "-f", "logs",
        "--env-kwargs", f"model_name_or_path:'{tiny_lm_path()}'", "prompts:['one two','good three']",
        "max_prompt_tokens:2", "max_new_tokens:4",
        "reward_model:importlib.import_module('textgym.tasks.synthetic').KeywordReward()"), cwd=tmp_path)
    assert "Using 8 environments" in result.stdout
    assert "kl/" in result.stdout and "penalised_return" in result.stdout
    model = PPO.load(tmp_path / "logs" / "ppo" / "TextGen-v0_1" / "TextGen-v0.zip", device="cpu")
    assert model.rollout_buffer_class is EpisodeRolloutBuffer and model.policy.value_learning_rate == 1e-4


def test_optimize_workers_share_one_study_with_the_text_sampler(tmp_path):
    import optuna

    storage, study_name = tmp_path / "study.log", "textgym-keyword"
    for seed in ("1", "2"):  # two workers, one after the other, each adding its trial to the same study
        args = train_args(KEYWORD, "-n", "256", "-optimize", "--n-trials", "1", "--n-evaluations", "1",
                          "--eval-episodes", "4", "--storage", str(storage), "--study-name", study_name,
                          "-f", "logs", "--no-optim-plots")
        args[args.index("--seed") + 1] = seed  # distinct seeds: the same seed would draw the same startup trial
        result = zoo("rl_zoo3.train", *args, cwd=tmp_path)
        assert "Writing report" in result.stdout
    study = optuna.load_study(study_name=study_name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(storage))))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for trial in study.trials:
        assert set(trial.params) == set(TEXT_PPO_SEARCH_SPACE)  # no net_arch / activation_fn
        assert trial.user_attrs["batch_size"] <= trial.params["n_steps"] * 4
    assert ast.literal_eval(study.user_attrs["policy_kwargs"]) == {"value_learning_rate": 1e-4}

    # --trial-id (not 0: the zoo skips a falsy id) replays a trial's hyperparameters; the zoo reads
    # them before it imports the yaml's callbacks, so agents.zoo must come with --gym-packages.
    zoo("rl_zoo3.train", *train_args(KEYWORD, "-n", "128", "-f", "best", "--storage", str(storage),
                                     "--study-name", study_name, "--trial-id", "1",
                                     gym_packages=("textgym", "agents.zoo")), cwd=tmp_path)
    model = PPO.load(tmp_path / "best" / "ppo" / f"{KEYWORD}_1" / f"{KEYWORD}.zip", device="cpu")
    params = study.trials[1].params
    assert model.n_steps == params["n_steps"] and model.policy.value_learning_rate == params["value_learning_rate"]


def test_converter_moves_value_learning_rate_into_policy_kwargs():
    params = dict(learning_rate=1e-3, value_learning_rate=1e-2, n_steps=32)
    assert convert_text_ppo_params(params, {"forbid_special_tokens": True}) == dict(
        learning_rate=1e-3, n_steps=32, policy_kwargs=dict(forbid_special_tokens=True, value_learning_rate=1e-2))
    assert "value_learning_rate" in params  # the input is left alone


@pytest.mark.parametrize("policy, text", [("<class 'agents.policy.policy.TransformerPolicy'>", True), ("MlpPolicy", False)])
def test_installed_sampler_dispatches_on_the_studys_policy(policy, text):
    import optuna
    from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER

    install_text_sampler()
    study = optuna.create_study()
    study.set_user_attr("policy", policy)
    study.set_user_attr("policy_kwargs", "{'value_learning_rate': 0.0001, 'forbid_special_tokens': True}")
    sampled = HYPERPARAMS_SAMPLER["ppo"](study.ask(), 0, 4, {})
    assert ("net_arch" in sampled["policy_kwargs"]) is not text
    if text:
        assert sampled["policy_kwargs"]["forbid_special_tokens"] is True
        assert sampled["batch_size"] <= sampled["n_steps"] * 4


def test_only_the_zoos_entry_point_installs_the_text_sampler():
    code = (
        "from rl_zoo3.hyperparams_opt import HYPERPARAMS_SAMPLER as S\n"
        "zoos = S['ppo']\n"
        "import agents.training.zoo\n"
        "print(S['ppo'] is zoos)\n"
        "import agents.zoo\n"
        "print(S['ppo'] is agents.training.zoo._sampler)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["True", "True"], result.stdout + result.stderr
    replay = subprocess.run([sys.executable, "-m", "agents.zoo", "--help"], capture_output=True, text=True, check=True)
    assert replay.stdout.startswith("usage: python -m agents.zoo"), replay.stdout + replay.stderr


def test_zoo_hyperparams_come_from_the_installed_zoo_with_schedules_converted():
    from agents.training.zoo import zoo_hyperparams

    cartpole = zoo_hyperparams("CartPole-v1")
    assert cartpole["n_envs"] == 8 and cartpole["n_steps"] == 32 and cartpole["policy"] == "MlpPolicy"
    assert cartpole["learning_rate"](1.0) == pytest.approx(1e-3) and cartpole["learning_rate"](0.5) == pytest.approx(5e-4)
    assert cartpole["clip_range"](0.0) == 0.0
    with pytest.raises(KeyError, match="no ppo hyperparameters for 'NoSuchEnv-v0'"):
        zoo_hyperparams("NoSuchEnv-v0")
