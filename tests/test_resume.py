"""Exact resume: a run saved, loaded and continued equals one that was never interrupted.

What is compared between the two runs: every tensor of the policy's state dict (LM, value head),
the value optimizer's Adam state, every episode the Monitor wrappers logged (return, length), and
the adaptive KL coefficient.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.save_util import load_from_zip_file, save_to_zip_file
from stable_baselines3.common.vec_env import VecNormalize

from agents import (
    AdaptiveKLController,
    KLPenaltyCallback,
    RollingCheckpointCallback,
    TransformerPolicy,
    latest_checkpoint,
    load_training_state,
    save_training_state,
    text_ppo_kwargs,
)
from agents.policy.policy import VALUE_OPTIMIZER_KEY
from textgym.tasks.recall import RecallGame
from textgym.tiny import save_tiny_lm

N_ENVS, N_STEPS = 2, 5  # 5 steps per env per rollout: episodes of up to 4 steps straddle rollouts
ROLLOUT = N_ENVS * N_STEPS
PPO_KWARGS = dict(n_steps=N_STEPS, batch_size=5, n_epochs=2, learning_rate=1e-3,
                  policy_kwargs=dict(value_learning_rate=1e-2))


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("resume_chat_lm"), chat=True))


@pytest.fixture(params=["TextGen-v0", "TextGen-Dialogue-v0"])
def env_setup(request, tiny_env_kwargs, chat_lm) -> tuple[str, dict]:
    """(env id, env kwargs): single-turn generation, and a two-turn game whose state lives in the game.

    Both without stop tokens, so every episode is 4 steps (4 tokens; two replies of 2) whatever is
    sampled, and an interruption after 2 rollouts (10 steps per env) is 2 steps into an episode."""
    if request.param == "TextGen-v0":
        return request.param, {**tiny_env_kwargs, "eos_token_id": None}
    return request.param, dict(game=RecallGame(), model_name_or_path=chat_lm, max_prompt_tokens=8,
                               max_context_tokens=16, max_reply_tokens=2, eos_token_id=None)


def make_env(env_setup, seed=0):
    env_id, env_kwargs = env_setup
    return make_vec_env(env_id, n_envs=N_ENVS, seed=seed, env_kwargs=env_kwargs)


def make_model(env_setup, **policy_kwargs):
    kwargs = text_ppo_kwargs(**PPO_KWARGS)
    kwargs["policy_kwargs"].update(policy_kwargs)
    return PPO(TransformerPolicy, make_env(env_setup), seed=0, **kwargs)


def kl_callback(reference_model: str | None = None) -> KLPenaltyCallback:
    # Target far above the KL of these runs: beta moves by the clipped -20 % x episodes / horizon every rollout.
    return KLPenaltyCallback(AdaptiveKLController(init_kl_coef=0.5, target=100.0, horizon=8),
                             reference_model=reference_model)


def monitor_episodes(model) -> list[list[tuple[float, int]]]:
    """Every finished episode's (return, length), per env, from the Monitor wrappers."""
    return [list(zip(env.episode_returns, env.episode_lengths)) for env in model.get_env().envs]


def assert_same_run(a, b, kl_a, kl_b):
    state_a, state_b = a.policy.state_dict(), b.policy.state_dict()
    assert set(state_a) == set(state_b)
    for name, tensor in state_a.items():
        torch.testing.assert_close(state_b[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, value in (a.policy.value_optimizer.state_dict()["state"].items()
                        if hasattr(a.policy, "value_optimizer") else ()):
        for key, tensor in value.items():
            torch.testing.assert_close(b.policy.value_optimizer.state_dict()["state"][name][key], tensor,
                                       rtol=0, atol=1e-6, msg=f"value optimizer {name} {key}")
    episodes_a, episodes_b = monitor_episodes(a), monitor_episodes(b)
    assert [len(e) for e in episodes_b] == [len(e) for e in episodes_a]
    for env_a, env_b in zip(episodes_a, episodes_b):
        np.testing.assert_allclose(np.array(env_b, dtype=float), np.array(env_a, dtype=float), rtol=0, atol=1e-6)
    assert [(e["r"], e["l"]) for e in b.ep_info_buffer] == [(e["r"], e["l"]) for e in a.ep_info_buffer]
    assert kl_b.controller.value == pytest.approx(kl_a.controller.value, rel=1e-12)
    assert b.num_timesteps == a.num_timesteps and b._n_updates == a._n_updates


def assert_mid_episode(model):
    """The premise, built by fixed-length episodes (``eos_token_id=None``, see ``env_setup``): the
    interruption cuts an episode in every env, which holds generated tokens of an unfinished episode."""
    states = [env.unwrapped.get_episode_state() for env in model.get_env().envs]
    tokens = [len(s.get("generated", s.get("context", []))) for s in states]
    assert all(n > 0 and not s["done"] for n, s in zip(tokens, states)), states


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(env_setup, tmp_path):
    kl_a = kl_callback()
    uninterrupted = make_model(env_setup)
    uninterrupted.learn(4 * ROLLOUT, callback=kl_a)

    first_half = make_model(env_setup)
    first_half.learn(2 * ROLLOUT, callback=kl_callback())
    assert_mid_episode(first_half)
    first_half.save(tmp_path / "run.zip")
    save_training_state(first_half, tmp_path / "run_state.pkl")
    del first_half

    resumed = PPO.load(tmp_path / "run.zip", env=make_env(env_setup, seed=123))  # the seed is overwritten
    load_training_state(resumed, tmp_path / "run_state.pkl")
    kl_b = kl_callback()  # a fresh callback with the same arguments adopts the saved controller
    resumed.learn(2 * ROLLOUT, callback=kl_b, reset_num_timesteps=False)
    assert kl_a.controller.value != pytest.approx(0.5)  # the controller did move
    assert_same_run(uninterrupted, resumed, kl_a, kl_b)


def test_bfloat16_run_resumes_exactly_with_its_float32_master_weights(tiny_env_kwargs, tmp_path):
    setup = ("TextGen-v0", {**tiny_env_kwargs, "eos_token_id": None})  # 4-step episodes: cut at 10 steps
    kl_a = kl_callback()
    uninterrupted = make_model(setup, dtype=torch.bfloat16)
    uninterrupted.learn(4 * ROLLOUT, callback=kl_a)
    first_half = make_model(setup, dtype=torch.bfloat16)
    first_half.learn(2 * ROLLOUT, callback=kl_callback())
    assert_mid_episode(first_half)
    first_half.save(tmp_path / "run.zip")
    save_training_state(first_half, tmp_path / "run_state.pkl")
    masters = [m.clone() for p, m in first_half.policy.master_weights.pairs if p is not m]

    resumed = PPO.load(tmp_path / "run.zip", env=make_env(setup))
    loaded = [(p, m) for p, m in resumed.policy.master_weights.pairs if p is not m]
    assert len(loaded) == len(masters) > 0
    # PPO.load restarts the masters from the loaded (rounded) weights, not from the pretrained ones
    assert all(torch.equal(m, p.float()) for p, m in loaded)
    assert any(not torch.equal(m, saved) for (_, m), saved in zip(loaded, masters))  # rounding lost something
    load_training_state(resumed, tmp_path / "run_state.pkl")
    assert all(torch.equal(m, saved) for (_, m), saved in zip(loaded, masters))
    kl_b = kl_callback()
    resumed.learn(2 * ROLLOUT, callback=kl_b, reset_num_timesteps=False)
    assert_same_run(uninterrupted, resumed, kl_a, kl_b)


def test_without_the_training_state_the_resumed_run_differs(tiny_env_kwargs, tmp_path):
    """The comparison above can fail: PPO.load alone (RNG, envs and the next observation lost) diverges."""
    setup = ("TextGen-v0", tiny_env_kwargs)
    kl_a = kl_callback()
    uninterrupted = make_model(setup)
    uninterrupted.learn(4 * ROLLOUT, callback=kl_a)
    first_half = make_model(setup)
    first_half.learn(2 * ROLLOUT, callback=kl_callback())
    first_half.save(tmp_path / "run.zip")
    resumed = PPO.load(tmp_path / "run.zip", env=make_env(setup))
    kl_b = kl_callback()
    resumed.learn(2 * ROLLOUT, callback=kl_b, reset_num_timesteps=False)
    with pytest.raises(AssertionError):
        assert_same_run(uninterrupted, resumed, kl_a, kl_b)


def test_rolling_checkpoints_with_training_state_resume_exactly(tiny_env_kwargs, tmp_path):
    """The realistic interruption: a run checkpointed during learn(4 rollouts), resumed from its middle
    (4-step episodes, so the checkpoint at 10 steps per env is inside an episode in both envs)."""
    setup = ("TextGen-v0", {**tiny_env_kwargs, "eos_token_id": None})
    kl_a = kl_callback()
    uninterrupted = make_model(setup)
    checkpoints = RollingCheckpointCallback(save_freq=N_STEPS + 1, save_path=str(tmp_path), keep_last=None,
                                            training_state=True)
    uninterrupted.learn(4 * ROLLOUT, callback=[kl_a, checkpoints])
    # Due after 6 and 12 calls (in rollouts 2 and 3), saved at the next rollout starts: 20 and 30 steps.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "rl_model_20_steps.zip", "rl_model_30_steps.zip", "rl_model_manifest_20_steps.json",
        "rl_model_manifest_30_steps.json", "rl_model_training_state_20_steps.pkl", "rl_model_training_state_30_steps.pkl"]
    newest = latest_checkpoint(tmp_path)
    assert (newest.steps, newest.model.name, newest.training_state.name) == (
        30, "rl_model_30_steps.zip", "rl_model_training_state_30_steps.pkl")

    resumed = PPO.load(tmp_path / "rl_model_20_steps.zip", env=make_env(setup))
    load_training_state(resumed, tmp_path / "rl_model_training_state_20_steps.pkl")
    assert_mid_episode(resumed)
    kl_b = kl_callback()
    resumed.learn(4 * ROLLOUT - resumed.num_timesteps, callback=kl_b, reset_num_timesteps=False)
    assert_same_run(uninterrupted, resumed, kl_a, kl_b)


def test_value_optimizer_state_survives_save_and_load(tiny_env_kwargs, tmp_path):
    model = make_model(("TextGen-v0", tiny_env_kwargs))
    model.learn(ROLLOUT)
    saved = model.policy.value_optimizer.state_dict()
    assert saved["state"] and all(s["step"] > 0 for s in saved["state"].values())
    model.save(tmp_path / "run.zip")
    loaded = PPO.load(tmp_path / "run.zip", env=model.get_env())
    restored = loaded.policy.value_optimizer.state_dict()
    assert restored["param_groups"] == saved["param_groups"]
    for index, state in saved["state"].items():
        for key, tensor in state.items():
            assert torch.equal(restored["state"][index][key], tensor), (index, key)
    # the main optimizer's state dict still loads as torch's (the value state is a key it never sees)
    assert VALUE_OPTIMIZER_KEY in model.policy.optimizer.state_dict()
    assert loaded.policy.optimizer.state_dict()["param_groups"][0]["lr"] == pytest.approx(1e-3)


def test_a_zip_without_value_optimizer_state_loads_with_a_warning(tiny_env_kwargs, tmp_path):
    """Zips saved before the value optimizer's state was kept: the weights load, its state restarts."""
    model = make_model(("TextGen-v0", tiny_env_kwargs))
    model.learn(ROLLOUT)
    model.save(tmp_path / "new.zip")
    data, params, variables = load_from_zip_file(tmp_path / "new.zip")
    del params["policy.optimizer"][VALUE_OPTIMIZER_KEY]
    save_to_zip_file(tmp_path / "old.zip", data=data, params=params, pytorch_variables=variables)
    with pytest.warns(UserWarning, match="no value-head optimizer state"):
        loaded = PPO.load(tmp_path / "old.zip", env=model.get_env())
    assert loaded.policy.value_optimizer.state_dict()["state"] == {}
    torch.testing.assert_close(loaded.policy.value_net.weight, model.policy.value_net.weight, rtol=0, atol=0)


def test_kl_callback_adopts_the_saved_controller_only_when_the_count_continues(tiny_env_kwargs, tmp_path):
    model = make_model(("TextGen-v0", tiny_env_kwargs))
    first = kl_callback()
    model.learn(ROLLOUT, callback=first)
    # beta moved: episodes of at most 4 tokens end within the 5-step rollout, whatever is sampled
    assert model.kl_controller is first.controller and first.controller.value < 0.5
    model.save(tmp_path / "run.zip")
    loaded = PPO.load(tmp_path / "run.zip", env=model.get_env())
    assert loaded.kl_controller.value == first.controller.value  # pickled with the model

    continued = kl_callback()
    loaded.learn(ROLLOUT, callback=continued, reset_num_timesteps=False)
    assert continued.controller is loaded.kl_controller

    fresh = kl_callback()  # a new count (reset_num_timesteps=True): the passed controller
    before = fresh.controller
    loaded.learn(ROLLOUT, callback=fresh)
    assert fresh.controller is before and loaded.kl_controller is before

    mine = KLPenaltyCallback(0.2, resume_controller=False)  # continuing, but the user's controller
    loaded.learn(ROLLOUT, callback=mine, reset_num_timesteps=False)
    assert mine.stats["kl/coef"] == 0.2 and loaded.kl_controller is mine.controller

    other = KLPenaltyCallback(AdaptiveKLController(0.5, target=3.0))
    with pytest.warns(UserWarning, match="resume_controller=False"):
        loaded.learn(ROLLOUT, callback=other, reset_num_timesteps=False)
    assert other.controller is mine.controller


class SaveAt(BaseCallback):
    """Calls save_training_state at one callback hook and keeps what it raised."""

    def __init__(self, hook: str, path):
        super().__init__()
        self.hook, self.path, self.error = hook, path, None

    def _try(self) -> None:
        try:
            save_training_state(self.model, self.path)
        except ValueError as error:
            self.error = error

    def _on_step(self) -> bool:
        if self.hook == "step" and self.error is None:
            self._try()
        return True

    def _on_rollout_end(self) -> None:
        if self.hook == "rollout_end":
            self._try()

    def _on_rollout_start(self) -> None:
        if self.hook == "rollout_start" and self.num_timesteps > 0:
            self._try()


@pytest.mark.parametrize(("hook", "where"), [("step", "in the middle of a rollout"),
                                             ("rollout_end", "before its update"),
                                             ("rollout_start", None)])
def test_saving_is_refused_inside_an_iteration(tiny_env_kwargs, tmp_path, hook, where):
    model = make_model(("TextGen-v0", tiny_env_kwargs))
    saver = SaveAt(hook, tmp_path / "state.pkl")
    model.learn(2 * ROLLOUT, callback=saver)
    if where is None:
        assert saver.error is None and (tmp_path / "state.pkl").is_file()
    else:
        assert where in str(saver.error)


def test_bad_input_fails_with_a_message(tiny_env_kwargs, tmp_path):
    setup = ("TextGen-v0", tiny_env_kwargs)
    model = make_model(setup)
    with pytest.raises(ValueError, match="has not collected a step"):
        save_training_state(model, tmp_path / "state.pkl")
    model.learn(ROLLOUT)
    save_training_state(model, tmp_path / "state.pkl")
    model.learn(ROLLOUT, reset_num_timesteps=False)
    with pytest.raises(ValueError, match=f"saved at {ROLLOUT} timesteps but the model is at {2 * ROLLOUT}"):
        load_training_state(model, tmp_path / "state.pkl")
    model.save(tmp_path / "run.zip")
    for other in ("run.zip", "other.pkl"):  # the zip instead of the state; a pickle of something else
        (tmp_path / "other.pkl").write_bytes(pickle.dumps({"x": 1}))
        with pytest.raises(ValueError, match="not a training-state file"):
            load_training_state(model, tmp_path / other)

    normalized = PPO(TransformerPolicy, VecNormalize(make_env(setup), norm_obs=False), seed=0,
                     **text_ppo_kwargs(**PPO_KWARGS))
    with pytest.raises(TypeError, match="VecNormalize"):
        save_training_state(normalized, tmp_path / "state.pkl")
    cartpole = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=1), n_steps=16, batch_size=16, n_epochs=1)
    cartpole.learn(16)
    with pytest.raises(TypeError, match="CartPoleEnv.* has no get_episode_state"):
        save_training_state(cartpole, tmp_path / "state.pkl")


def test_episode_state_round_trip_and_checks(make_tiny_env, chat_lm):
    from textgym.dialogue import DialogueEnv

    env = make_tiny_env().unwrapped
    env.reset(seed=0)
    env.step(5)
    state = env.get_episode_state()
    other = make_tiny_env().unwrapped
    other.set_episode_state(state)
    assert other.get_episode_state() == state
    assert other.step(6)[0]["input_ids"].tolist() == env.step(6)[0]["input_ids"].tolist()
    with pytest.raises(ValueError, match="missing \\['done'\\]"):
        other.set_episode_state({k: v for k, v in state.items() if k != "done"})
    with pytest.raises(ValueError, match="windows"):
        other.set_episode_state({**state, "generated": [5] * 10})

    dialogue = DialogueEnv(RecallGame(), model_name_or_path=chat_lm, max_prompt_tokens=8, max_context_tokens=16,
                           max_reply_tokens=2)
    dialogue.reset(seed=0)
    dialogue.step(5), dialogue.step(6)  # the first reply ends: the game draws its secret
    saved = dialogue.get_episode_state()
    assert saved["game"] is not dialogue.game and saved["game"].secret == dialogue.game.secret
    with pytest.raises(TypeError, match="DialogueGame"):
        dialogue.set_episode_state({**saved, "game": object()})


@pytest.mark.parametrize("algorithm", ["rloo", "nlpo"])
@pytest.mark.parametrize("sabotage", [False, True])
def test_group_relative_and_nlpo_runs_resume_exactly(algorithm, sabotage, tiny_env_kwargs, tmp_path, monkeypatch):
    """RLOO keeps the returns of the episodes a rollout cut (with the KL penalties already in them);
    NLPO keeps its rollout count (refreshes at rollouts 0 and 3, interrupted after 2) and its masking
    LM as last refreshed. Sabotage: without the algorithm's state the resumed run differs.

    RLOO's premises are built: an episode cut by the rollout boundary (without stop tokens every
    episode is 4 steps, conftest.MAX_NEW_TOKENS, so each env's rollout of 5 steps ends inside an
    episode whatever tokens are sampled), and cut episodes whose carried returns differ within
    their group (RLOO's advantages only see differences): the KL reference is another random LM,
    so every token's penalty is of order one from the first step, where a reference equal to the
    untrained policy gives penalties of 1e-7, below the comparison's tolerance."""
    from sb3_contrib import MaskablePPO

    from agents import MaskableTransformerPolicy, NLPOCallback, group_ppo_kwargs, nlpo_kwargs
    from agents.training import resume as resume_module
    from textgym.vec_env import GroupedPrompts

    def make_env(seed=0):
        if algorithm == "rloo":
            env_kwargs = {**tiny_env_kwargs, "eos_token_id": None}  # fixed-length episodes: see the docstring
            return GroupedPrompts(make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=seed, env_kwargs=env_kwargs), N_ENVS)
        return make_vec_env("TextGen-v0", n_envs=N_ENVS, seed=seed, env_kwargs=tiny_env_kwargs)

    kwargs, reference = {**PPO_KWARGS, "policy_kwargs": {}}, None
    if algorithm == "rloo":
        algo, make = PPO, lambda: PPO(TransformerPolicy, make_env(), seed=0, **group_ppo_kwargs("rloo", **kwargs))
        learn_kwargs, callbacks = {}, lambda kl: [kl]
        reference = str(save_tiny_lm(tmp_path / "reference", seed=1))
    else:
        kwargs["policy_kwargs"] = dict(top_p=0.8, target_update_iterations=3)
        algo, make = MaskablePPO, lambda: MaskablePPO(MaskableTransformerPolicy, make_env(), seed=0, **nlpo_kwargs(**kwargs))
        learn_kwargs, callbacks = dict(use_masking=False), lambda kl: [kl, NLPOCallback()]
    if sabotage:
        monkeypatch.setattr(resume_module, "_set_algorithm_state", lambda model, state, path: None)

    kl_a = kl_callback(reference)
    uninterrupted = make()
    uninterrupted.learn(4 * ROLLOUT, callback=callbacks(kl_a), **learn_kwargs)
    first_half = make()
    first_half.learn(2 * ROLLOUT, callback=callbacks(kl_callback(reference)), **learn_kwargs)
    if algorithm == "rloo":  # the premises (docstring): penalties carried into rollout 3, unequal within the group
        carried = first_half.rollout_buffer._carry_out
        assert carried.all() and np.ptp(carried) > 1e-3, carried
    first_half.save(tmp_path / "run.zip")
    save_training_state(first_half, tmp_path / "run_state.pkl")
    resumed = algo.load(tmp_path / "run.zip", env=make_env(seed=123))
    load_training_state(resumed, tmp_path / "run_state.pkl")
    kl_b = kl_callback(reference)
    resumed.learn(2 * ROLLOUT, callback=callbacks(kl_b), reset_num_timesteps=False, **learn_kwargs)
    if sabotage:
        with pytest.raises(AssertionError):
            assert_same_run(uninterrupted, resumed, kl_a, kl_b)
    else:
        assert_same_run(uninterrupted, resumed, kl_a, kl_b)
        if algorithm == "nlpo":
            assert resumed.policy.masking_refreshes == uninterrupted.policy.masking_refreshes == [0, 3]
