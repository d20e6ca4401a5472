"""LoRA adapters (peft) in TransformerPolicy: what trains, the adapter-free reference, save/load, errors."""

from __future__ import annotations

import contextlib
import pickle

import numpy as np
import pytest
import torch
from peft import LoraConfig
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM

import agents.algorithms.kl
from agents import KLPenaltyCallback, TransformerPolicy, adapters_disabled, merged_lm, text_ppo_kwargs
from agents.algorithms.kl import reference_log_probs
from agents.policy.lora import lora_config_dict

# GPT-2's attention projection is a transformers Conv1D, whose weight is stored (in, out).
LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
SCORE, BETA = 0.3, 0.5


def constant_reward(prompts, completions):
    return [SCORE] * len(completions)


def make_model(env_kwargs, lora_config=LORA, n_envs=2, **kwargs):
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    ppo = dict(n_steps=8, batch_size=16, n_epochs=2, learning_rate=1e-2)
    return PPO(TransformerPolicy, env, seed=0,
               **text_ppo_kwargs(**{**ppo, **kwargs}, policy_kwargs=dict(lora_config=lora_config)))


def rollout_obs(model, env_kwargs, n_envs=2):
    """Observations and sampled actions of 3 steps in fresh envs: ``{"input_ids", "attention_mask"}`` (6, L), (6,)."""
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=1, env_kwargs=env_kwargs)
    obs = env.reset()
    observations, actions = [], []
    for _ in range(3):
        action, _ = model.predict(obs)
        observations.append(obs)
        actions.append(action)
        obs, *_ = env.step(action)
    batch = {k: torch.as_tensor(np.concatenate([o[k] for o in observations])) for k in obs}
    return batch, torch.as_tensor(np.concatenate(actions))


def lm_log_probs(lm, batch, actions):
    return reference_log_probs(lm, batch["input_ids"], batch["attention_mask"], actions)


def test_lora_config_is_stored_as_a_plain_dict():
    config = LoraConfig(**LORA)
    plain = lora_config_dict(config)
    assert {key: plain[key] for key in LORA} == LORA  # the set {"c_attn"} came back as a list
    assert plain["lora_dropout"] == 0.0 and plain["bias"] == "none"  # defaults are kept too
    assert lora_config_dict(LORA) == plain
    assert LoraConfig(**plain).to_dict() == config.to_dict()
    assert pickle.loads(pickle.dumps(plain)) == plain
    with pytest.raises(TypeError, match="LoraConfig"):
        lora_config_dict(["c_attn"])


def test_only_adapters_and_value_head_change_in_an_update(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs)
    policy = model.policy
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable == {f"features_extractor.lm.transformer.h.{i}.attn.c_attn.lora_{m}.default.weight"
                         for i in (0, 1) for m in "AB"} | {"value_net.weight", "value_net.bias"}
    in_optimizers = [p for opt in (policy.optimizer, policy.value_optimizer) for g in opt.param_groups for p in g["params"]]
    assert len(in_optimizers) == 6 and all(p.requires_grad for p in in_optimizers)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    model.learn(32)  # two rollouts, two updates
    after = policy.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # Every adapter and the value head moved; every other tensor is bit-identical.
    assert {name.replace("pi_features_extractor", "features_extractor").replace("vf_features_extractor", "features_extractor")
            for name in changed} == trainable
    assert policy.peft_model.base_model.model is policy.lm


def test_disabled_adapters_are_exactly_the_pretrained_model_after_training(tiny_env_kwargs, tiny_lm):
    model = make_model(tiny_env_kwargs)
    model.learn(32)
    batch, actions = rollout_obs(model, tiny_env_kwargs)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    expected = lm_log_probs(base, batch, actions)
    adapted = lm_log_probs(model.policy.lm, batch, actions)
    assert (adapted - expected).abs().max() > 1e-3  # training moved the adapted policy away from the base
    with adapters_disabled(model.policy) as lm:
        assert lm is model.policy.lm
        torch.testing.assert_close(lm_log_probs(lm, batch, actions), expected, rtol=0, atol=1e-6)
        # what the env sees: the policy's own distribution through SB3's interface
        dist = model.policy.get_distribution(batch)
        torch.testing.assert_close(dist.log_prob(actions), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(lm_log_probs(model.policy.lm, batch, actions), adapted, rtol=0, atol=0)


def test_kl_reference_is_the_policy_without_adapters_not_a_second_model(tiny_env_kwargs, tiny_lm, monkeypatch):
    def no_second_model(*args, **kwargs):
        raise AssertionError("KLPenaltyCallback loaded a second model for a LoRA policy")

    monkeypatch.setattr(agents.algorithms.kl, "load_causal_lm", no_second_model)
    model = make_model({**tiny_env_kwargs, "reward_model": constant_reward}, n_steps=12, batch_size=8)
    batch, actions = rollout_obs(model, tiny_env_kwargs)
    with adapters_disabled(model.policy) as lm:  # before any update: adapters add exactly 0 (B = 0)
        disabled = lm_log_probs(lm, batch, actions)
    assert torch.equal(disabled, lm_log_probs(model.policy.lm, batch, actions))

    callback = KLPenaltyCallback(BETA)
    model.learn(24, callback=callback)  # one rollout; its penalty is computed before the update
    assert callback.reference is None
    # The rollout's log-probs come from the rollout forward, the reference from one forward per
    # episode: the same function, different float rounding.
    assert abs(callback.stats["kl/episode_kl"]) < 1e-5
    assert callback.stats["kl/penalised_return"] == pytest.approx(callback.stats["kl/score"], abs=1e-5)

    model.learn(24, callback=callback, reset_num_timesteps=False)  # a rollout after an update at lr 1e-2
    buffer = model.rollout_buffer
    n_steps, n_envs = 12, 2
    unflatten = lambda a: a.reshape(n_envs, n_steps).T  # noqa: E731  (env-major -> (n_steps, n_envs))
    obs = {k: torch.as_tensor(v) for k, v in buffer.observations.items()}
    base = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    ref = unflatten(lm_log_probs(base, obs, torch.as_tensor(buffer.actions.reshape(-1))).numpy())
    kl = unflatten(buffer.log_probs.reshape(-1)) - ref
    starts = buffer.episode_starts
    score = SCORE * starts[1:]  # the score arrives on the step before the next episode starts
    assert abs(kl).max() > 1e-3
    torch.testing.assert_close(torch.as_tensor(buffer.rewards[:-1]), torch.as_tensor(score - BETA * kl[:-1]),
                               rtol=0, atol=1e-5)


def test_save_load_keeps_the_adapters(tiny_env_kwargs, tmp_path):
    model = make_model(tiny_env_kwargs, lora_config=LoraConfig(**LORA))  # a config object, not a dict
    model.learn(16)
    assert model.policy.lora_config == lora_config_dict(LORA)
    assert model.policy._get_constructor_parameters()["lora_config"] == lora_config_dict(LORA)
    obs = model.get_env().reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip", env=model.get_env())
    assert loaded.policy.lora_config == lora_config_dict(LORA) and loaded.policy.peft_model is not None
    state, loaded_state = model.policy.state_dict(), loaded.policy.state_dict()
    assert set(state) == set(loaded_state)
    # (SB3 lists the shared extractor under three names: features_, pi_features_, vf_features_extractor)
    lora_b = [name for name in state if "lora_B" in name and name.startswith("features_extractor.")]
    assert len(lora_b) == 2 and all(state[name].abs().max() > 0 for name in lora_b)  # trained, not the B = 0 init
    for name, tensor in state.items():
        torch.testing.assert_close(loaded_state[name], tensor, rtol=0, atol=0)
    assert not loaded.policy.lm.transformer.wte.weight.requires_grad
    assert (loaded.predict(obs, deterministic=True)[0] == actions).all()


def test_merged_copy_is_a_plain_model_with_the_same_outputs(tiny_env_kwargs, tmp_path):
    model = make_model(tiny_env_kwargs)
    model.learn(16)
    batch, actions = rollout_obs(model, tiny_env_kwargs)
    adapted = lm_log_probs(model.policy.lm, batch, actions)
    merged_lm(model.policy).save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name or "base_layer" in name for name in reloaded.state_dict())
    torch.testing.assert_close(lm_log_probs(reloaded, batch, actions), adapted, rtol=0, atol=1e-5)
    # the policy keeps its adapters
    torch.testing.assert_close(lm_log_probs(model.policy.lm, batch, actions), adapted, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("lora_config", "error", "match"),
    [
        (dict(r=4, target_modules=["q_proj", "v_proj"]), ValueError, r"targets no layer of .*'c_attn'"),
        (dict(rank=4, target_modules=["c_attn"]), TypeError, "rank"),
        ("c_attn", TypeError, "LoraConfig"),
    ],
)
def test_bad_lora_config_fails_at_construction(tiny_env_kwargs, lora_config, error, match):
    with pytest.raises(error, match=match):
        make_model(tiny_env_kwargs, lora_config=lora_config)


def test_adapters_disabled_needs_adapters(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs, lora_config=None)
    assert model.policy.peft_model is None and model.policy.lora_config is None
    with pytest.raises(ValueError, match="no LoRA adapters"):
        with adapters_disabled(model.policy):
            pass


def test_rollout_kv_cache_follows_adapters_switched_off_and_on_directly(tiny_env_kwargs):
    """peft's own ``disable_adapter()`` between rollout steps (not via adapters_disabled) drops the cache."""
    model = make_model(tiny_env_kwargs)
    policy = model.policy
    with torch.no_grad():  # non-zero B: adapters on and off give different features
        for name, param in policy.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    policy.set_training_mode(False)
    env = make_vec_env("TextGen-v0", n_envs=2, seed=1, env_kwargs=tiny_env_kwargs)
    obs = env.reset()
    for step in range(6):
        batch = {k: torch.as_tensor(v) for k, v in obs.items()}
        adapters_off = step % 3 == 2
        with torch.no_grad():
            with policy.peft_model.disable_adapter() if adapters_off else contextlib.nullcontext():
                actions, _, log_prob = policy(batch)  # a rollout step: KV-cached
                uncached = policy.evaluate_actions(batch, actions)[1]
            adapters_on = policy.evaluate_actions(batch, actions)[1]
        torch.testing.assert_close(log_prob, uncached, rtol=0, atol=1e-5)
        if adapters_off:
            assert (log_prob - adapters_on).abs().max() > 1e-2  # the toggle matters
        obs, *_ = env.step(actions.numpy())


def test_adapters_checkpoint_rebuilds_the_policy_with_identical_logits(tiny_env_kwargs, tiny_lm, tmp_path):
    from peft import PeftModel

    from agents import load_adapters, save_adapters

    model = make_model(tiny_env_kwargs)
    model.learn(16)
    policy = model.policy
    save_adapters(policy, tmp_path / "adapters")
    assert {"adapter_config.json", "adapter_model.safetensors", "policy_heads.safetensors",
            "policy_config.pth"} <= {p.name for p in (tmp_path / "adapters").iterdir()}
    policy.save(tmp_path / "policy.pth")  # SB3's policy-only file: the frozen base weights too
    size = sum(p.stat().st_size for p in (tmp_path / "adapters").iterdir())
    assert size < (tmp_path / "policy.pth").stat().st_size / 2

    batch, actions = rollout_obs(model, tiny_env_kwargs)
    with torch.no_grad():
        expected_logits = policy.get_distribution(batch).distribution.logits
        expected_values = policy.predict_values(batch)
    assert expected_values.abs().max() > 0  # the value head trained: it is part of the checkpoint
    fresh = make_model(tiny_env_kwargs, learning_rate=1e-3).policy  # same lora_config, untrained adapters
    for loaded in (load_adapters(tmp_path / "adapters"), load_adapters(tmp_path / "adapters", policy=fresh)):
        assert isinstance(loaded, TransformerPolicy) and loaded.lora_config == policy.lora_config
        with torch.no_grad():
            torch.testing.assert_close(loaded.get_distribution(batch).distribution.logits, expected_logits, rtol=0, atol=0)
            torch.testing.assert_close(loaded.predict_values(batch), expected_values, rtol=0, atol=0)
    assert loaded is fresh

    # peft reads the same folder onto the base model: the policy's LM
    peft_lm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapters").eval()
    lm = peft_lm.base_model.model  # the transformers model with the adapters injected, as policy.lm
    torch.testing.assert_close(lm_log_probs(lm, batch, actions), lm_log_probs(policy.lm, batch, actions), rtol=0, atol=1e-6)


def test_adapters_checkpoint_errors(tiny_env_kwargs, tmp_path):
    from agents import load_adapters, save_adapters

    with pytest.raises(ValueError, match="no LoRA adapters"):
        save_adapters(make_model(tiny_env_kwargs, lora_config=None).policy, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="not a folder written by agents.save_adapters"):
        load_adapters(tmp_path)
    save_adapters(make_model(tiny_env_kwargs).policy, tmp_path / "adapters")
    other = make_model(tiny_env_kwargs, lora_config=dict(LORA, r=2)).policy
    with pytest.raises(ValueError, match="lora_config"):
        load_adapters(tmp_path / "adapters", policy=other)
