"""Token masks: padded vocabularies and forbidden tokens are never sampled; log-probs renormalise exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM, AutoTokenizer

from agents import TransformerPolicy, text_ppo_kwargs
from agents.algorithms.kl import reference_log_probs
from textgym.tiny import save_tiny_lm

PROMPTS = ["the movie was", "a film is"]
PAD_ROWS = 6


@pytest.fixture(scope="module")
def padded_lm(tmp_path_factory) -> str:
    """The tiny GPT-2 with its vocabulary padded by PAD_ROWS rows the tokenizer cannot decode."""
    path = save_tiny_lm(tmp_path_factory.mktemp("padded_lm"))
    lm = AutoModelForCausalLM.from_pretrained(path)
    lm.resize_token_embeddings(len(AutoTokenizer.from_pretrained(path)) + PAD_ROWS)  # new rows: the mean row
    lm.save_pretrained(path)
    return str(path)


def make_model(lm: str, vocab_size: int | None = None, chat: bool = False, **policy_kwargs) -> PPO:
    env_kwargs = dict(model_name_or_path=lm, prompts=PROMPTS, reward_model=lambda p, c: [0.0] * len(c),
                      max_prompt_tokens=8, max_new_tokens=4, vocab_size=vocab_size, chat_template=chat)
    env = make_vec_env("TextGen-v0", n_envs=4, seed=0, env_kwargs=env_kwargs)
    return PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(n_steps=8, batch_size=32, policy_kwargs=policy_kwargs))


def sampled_actions(model: PPO, steps: int = 60) -> np.ndarray:
    env, obs, actions = model.env, model.env.reset(), []
    for _ in range(steps):
        action, _ = model.predict(obs)
        actions.append(action)
        obs, *_ = env.step(action)
    return np.concatenate(actions)


def assert_renormalised(model: PPO, masked: list[int]) -> None:
    """evaluate_actions' log-probs = log_softmax of the LM's logits over the allowed ids only."""
    policy = model.policy
    obs = {k: torch.as_tensor(v) for k, v in model.env.reset().items()}
    allowed = torch.tensor([i for i in range(model.action_space.n) if i not in masked])
    actions = allowed[torch.arange(len(obs["input_ids"])) % len(allowed)]
    with torch.no_grad():
        _, log_prob, _ = policy.evaluate_actions(obs, actions)
        logits = policy.action_net(policy.extract_features(obs))
        columns = torch.searchsorted(allowed, actions)  # each action's index among the allowed ids
        expected = torch.log_softmax(logits[:, allowed], -1)[torch.arange(len(actions)), columns]
        via_reference = reference_log_probs(policy.lm, obs["input_ids"], obs["attention_mask"], actions,
                                            logit_mask=policy.logit_mask)
    torch.testing.assert_close(log_prob, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(via_reference, expected, rtol=0, atol=1e-5)


def test_padded_vocabulary_rows_are_never_sampled(padded_lm):
    vocab = len(AutoTokenizer.from_pretrained(padded_lm))
    model = make_model(padded_lm, vocab_size=vocab + PAD_ROWS)
    padded = list(range(vocab, vocab + PAD_ROWS))
    assert model.policy.logit_mask.nonzero().flatten().tolist() == padded
    assert not np.isin(sampled_actions(model), padded).any()
    assert_renormalised(model, padded)
    # Without the mask the padded rows would be sampled: they hold the mean embedding row. Sampled,
    # and kept so: the 6 padded rows hold 0.24 of the mass at the prompts (measured), so none of
    # the 240 draws hitting them has odds of about 0.76 ** 240 < 1e-28.
    model.policy.logit_mask = None
    assert np.isin(sampled_actions(model), padded).any()


def test_forbid_special_tokens_keeps_the_stop_tokens(tmp_path):
    lm = str(save_tiny_lm(tmp_path / "chat", chat=True))
    model = make_model(lm, chat=True, forbid_special_tokens=True, forbidden_token_ids=[5])
    forbidden = [0, 1, 3, 5]  # <pad>, <unk>, <|im_start|>, and "good"; <eos> (2) and <|im_end|> (4) stay allowed
    assert model.policy.logit_mask.nonzero().flatten().tolist() == forbidden
    assert not np.isin(sampled_actions(model), forbidden).any()
    assert_renormalised(model, forbidden)
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", env=model.env)
    assert torch.equal(loaded.policy.logit_mask, model.policy.logit_mask)


def test_no_mask_without_padding_or_options(tiny_lm):
    assert make_model(tiny_lm).policy.logit_mask is None


def test_bad_forbidden_ids_fail_at_construction(tiny_lm):
    with pytest.raises(ValueError, match="forbidden_token_ids holds 999"):
        make_model(tiny_lm, forbidden_token_ids=[999])
