"""TransformerPolicy: exact log-probs, untouched pretrained weights, dropout off, save/load, A2C."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents import TransformerPolicy, text_ppo_kwargs

SMALL_PPO = dict(n_steps=8, batch_size=16, n_epochs=2, learning_rate=1e-3)


def make_model(env_kwargs, n_envs=2, algo=PPO, **kwargs):
    env = make_vec_env("TextGen-v0", n_envs=n_envs, seed=0, env_kwargs=env_kwargs)
    if algo is PPO:
        kwargs = text_ppo_kwargs(**{**SMALL_PPO, **kwargs})
    return algo(TransformerPolicy, env, seed=0, **kwargs)


def obs_tensors(obs: dict) -> dict:
    return {k: torch.as_tensor(v) for k, v in obs.items()}


def test_log_probs_are_log_softmax_of_the_lm_logits(tiny_env_kwargs, tiny_lm, make_tiny_env):
    """Left-padded window observations give the LM's own next-token distribution of the unpadded text."""
    model = make_model(tiny_env_kwargs)
    env = make_tiny_env()
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    for prompt, generated in [("a film is", []), ("one two", [3, 5]), ("the film was very", [7])]:
        env.reset(options={"prompt": prompt})
        for token in generated:
            obs, *_ = env.step(token)
        obs = env.unwrapped.observation_space.encode(env.unwrapped._prompt_tokens, generated)
        unpadded = torch.tensor([env.unwrapped._prompt_tokens + generated])
        with torch.no_grad():
            expected = torch.log_softmax(lm(unpadded).logits[0, -1], dim=-1)
            batch = {k: torch.as_tensor(v)[None] for k, v in obs.items()}
            actions = torch.arange(19)
            log_probs = model.policy.get_distribution(batch).distribution.logits[0]
            _, per_action, _ = model.policy.evaluate_actions({k: v.expand(19, -1) for k, v in batch.items()}, actions)
        torch.testing.assert_close(log_probs, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(per_action, expected, rtol=0, atol=1e-5)


def test_pretrained_weights_are_not_reinitialised_and_value_starts_at_zero(tiny_env_kwargs, tiny_lm):
    policy = make_model(tiny_env_kwargs).policy
    reference = AutoModelForCausalLM.from_pretrained(tiny_lm)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(policy.lm.state_dict()[name], tensor, rtol=0, atol=0)
    assert policy.action_net is policy.lm.get_output_embeddings()
    assert torch.count_nonzero(policy.value_net.weight) == 0


def test_dropout_stays_off_in_training_mode(tiny_env_kwargs, tiny_lm, tmp_path):
    lm = AutoModelForCausalLM.from_pretrained(tiny_lm, resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)
    lm.save_pretrained(tmp_path)  # same weights, heavy dropout configured
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(tmp_path)
    policy = make_model({**tiny_env_kwargs, "model_name_or_path": str(tmp_path)}).policy
    env = make_vec_env("TextGen-v0", n_envs=4, seed=0, env_kwargs=tiny_env_kwargs)
    obs = obs_tensors(env.reset())
    policy.set_training_mode(True)
    actions = torch.tensor([3, 4, 5, 6])
    first = policy.evaluate_actions(obs, actions)[1]
    second = policy.evaluate_actions(obs, actions)[1]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_token_ids_are_read_as_integers_not_floats(tiny_env_kwargs):
    policy = make_model(tiny_env_kwargs).policy
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=tiny_env_kwargs)
    obs = obs_tensors(env.reset())
    as_float = {k: v.float() for k, v in obs.items()}  # what SB3's default buffers would hand back
    with torch.no_grad():
        torch.testing.assert_close(policy.extract_features(obs), policy.extract_features(as_float), rtol=0, atol=0)


def test_predict_save_load_roundtrip(tiny_env_kwargs, tmp_path):
    model = make_model(tiny_env_kwargs)
    model.learn(16)
    obs = model.get_env().reset()
    expected_values = model.policy.predict_values(obs_tensors(obs))
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "ppo.zip")
    loaded = PPO.load(tmp_path / "ppo.zip", env=model.get_env())
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    torch.testing.assert_close(loaded.policy.predict_values(obs_tensors(obs)), expected_values, rtol=0, atol=0)
    for name, tensor in model.policy.state_dict().items():
        torch.testing.assert_close(loaded.policy.state_dict()[name], tensor, rtol=0, atol=0)


def test_a2c_trains_unchanged(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs, algo=A2C, n_steps=4, learning_rate=1e-3)
    before = model.policy.value_net.weight.detach().clone()
    model.learn(32)
    assert not torch.equal(before, model.policy.value_net.weight)


def test_vocab_mismatch_is_an_error_at_construction(tiny_env_kwargs):
    with pytest.raises(ValueError, match="vocab_size=19"):
        make_model({**tiny_env_kwargs, "vocab_size": 25})


@pytest.mark.parametrize(
    ("policy_kwargs", "match"),
    [(dict(ortho_init=True), "pretrained"), (dict(net_arch=[64]), "actor layers"),
     (dict(min_shared_prefix=0), "min_shared_prefix must be a positive number of tokens or None")],
)
def test_settings_that_would_break_the_lm_are_rejected(tiny_env_kwargs, policy_kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(tiny_env_kwargs, policy_kwargs=policy_kwargs)


def test_window_longer_than_the_model_is_rejected(tiny_env_kwargs):
    with pytest.raises(ValueError, match="positions"):
        make_model({**tiny_env_kwargs, "max_new_tokens": 64})


def test_value_head_has_its_own_fixed_learning_rate(tiny_env_kwargs):
    model = make_model(tiny_env_kwargs, learning_rate=1e-6, policy_kwargs=dict(value_learning_rate=1e-2))
    policy = model.policy
    value_ids = {id(p) for p in policy.value_net.parameters()}
    assert not any(id(p) in value_ids for group in policy.optimizer.param_groups for p in group["params"])
    before = policy.value_net.weight.detach().clone()
    model.learn(32)
    assert policy.optimizer.param_groups[0]["lr"] == 1e-6
    assert policy.value_optimizer.param_groups[0]["lr"] == 1e-2
    # Four Adam steps at 1e-2 move each weight by up to ~4e-2; at the LM's 1e-6 they would stay ~0.
    assert (policy.value_net.weight - before).abs().max() > 1e-3
    assert all(p.grad is None or not p.grad.any() for p in policy.value_net.parameters())


def test_text_defaults_merge_policy_kwargs():
    kwargs = text_ppo_kwargs(policy_kwargs=dict(model_name_or_path="x"), gamma=0.5)
    assert kwargs["policy_kwargs"] == dict(value_learning_rate=1e-4, model_name_or_path="x")
    assert kwargs["gamma"] == 0.5 and text_ppo_kwargs()["gamma"] == 1.0
    with pytest.raises(TypeError, match="no parameter"):
        text_ppo_kwargs(n_step=3)


def test_a_model_that_rescales_logits_after_its_head_fails_at_construction(tmp_path):
    """Gemma-2 soft-caps its logits after the head: the head on the hidden state is not the model."""
    from gymnasium import spaces
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from textgym.spaces import TokenWindowSpace

    def build(softcap):
        config = Gemma2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                              final_logit_softcapping=softcap)
        torch.manual_seed(0)
        path = tmp_path / f"gemma2_{softcap}"
        Gemma2ForCausalLM(config).save_pretrained(path)
        return TransformerPolicy(TokenWindowSpace(32, 4, 4, str(path)), spaces.Discrete(32), lambda _: 1e-3,
                                 kv_cache=False)

    with pytest.raises(ValueError, match=r"changes its logits after the output head.*final_logit_softcapping"):
        build(0.5)
    build(None)  # the same architecture without soft-capping is the pretrained policy


def test_an_encoder_decoder_model_fails_with_a_clear_message(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from agents import load_causal_lm

    config = T5Config(vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="is an encoder-decoder model"):
        load_causal_lm(str(tmp_path / "t5"))
