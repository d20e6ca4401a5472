"""export_pretrained: a Hugging Face directory that transformers loads as the trained policy's LM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, pipeline

from agents import TextEvaluation, TransformerPolicy, export_pretrained, text_ppo_kwargs
from agents.training.export import MLP_PREFIX, VALUE_HEAD_FILE
from tests.conftest import MAX_NEW_TOKENS, PROMPTS, keyword_reward

LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
TOKENS = torch.tensor([[7, 8, 9, 5], [4, 3, 10, 12]])  # "the a is movie", "bad good was not"


def words_and_keyword(prompts, completions):
    """Words generated (stopping early costs) plus occurrences of "good": rewards that vary from the start."""
    return [len(c.split()) / MAX_NEW_TOKENS + c.split().count("good") for c in completions]


def env_kwargs(tiny_lm: str) -> dict:
    return {"model_name_or_path": tiny_lm, "prompts": PROMPTS, "reward_model": words_and_keyword,
            "max_prompt_tokens": 5, "max_new_tokens": MAX_NEW_TOKENS}


def trained_model(tiny_lm: str, **policy_kwargs) -> PPO:
    """PPO on the tiny LM after two updates (learning rate 1e-2: every trained weight moved)."""
    env = make_vec_env("TextGen-v0", n_envs=2, seed=0, env_kwargs=env_kwargs(tiny_lm))
    model = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(
        n_steps=8, batch_size=16, n_epochs=2, learning_rate=1e-2, target_kl=None,
        policy_kwargs=dict(value_learning_rate=1e-2, **policy_kwargs)))
    model.learn(total_timesteps=32)
    return model


@pytest.fixture(scope="module")
def full_model(tiny_lm):
    return trained_model(tiny_lm)


@pytest.fixture(scope="module")
def lora_model(tiny_lm):
    return trained_model(tiny_lm, lora_config=LORA, net_arch=dict(pi=[], vf=[8]))


def logits(lm, ids=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids).logits


def observations(model, n_steps: int = 3) -> dict[str, torch.Tensor]:
    """Left-padded window observations of a few rollout steps, ``(2 * n_steps, L)``."""
    env = make_vec_env("TextGen-v0", n_envs=2, seed=3, env_kwargs=env_kwargs(model.policy.model_name_or_path))
    obs, batches = env.reset(), []
    for _ in range(n_steps):
        batches.append(obs)
        action, _ = model.predict(obs)
        obs, *_ = env.step(action)
    return {k: torch.as_tensor(np.concatenate([b[k] for b in batches])) for k in obs}


def exported_values(directory, obs) -> torch.Tensor:
    """The critic rebuilt from the export alone: transformers trunk + value_head.safetensors."""
    lm = AutoModelForCausalLM.from_pretrained(directory).eval()
    state = load_file(str(directory / VALUE_HEAD_FILE))
    mlp = {k[len(MLP_PREFIX):]: v for k, v in state.items() if k.startswith(MLP_PREFIX)}
    layers = []
    for i in range(len(mlp) // 2):
        weight = mlp[f"{2 * i}.weight"]
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
        layer.load_state_dict({"weight": weight, "bias": mlp[f"{2 * i}.bias"]})
        layers += [layer, torch.nn.Tanh()]  # SB3's default activation_fn for actor-critic policies
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    values = []
    with torch.no_grad():
        for ids, mask in zip(obs["input_ids"], obs["attention_mask"]):
            hidden = lm.base_model(input_ids=ids[mask.bool()][None].long()).last_hidden_state[0, -1]
            values.append(head(torch.nn.Sequential(*layers)(hidden)))
    return torch.stack(values)


def test_full_fine_tuning_export_loads_as_the_trained_lm(full_model, tiny_lm, tmp_path):
    policy = full_model.policy
    directory = export_pretrained(full_model, tmp_path / "export")
    assert directory == tmp_path / "export"
    exported = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.testing.assert_close(logits(exported), logits(policy.lm), rtol=0, atol=1e-5)
    untrained = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert (logits(exported) - logits(untrained)).abs().max() > 1e-2  # training moved the weights

    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(tiny_lm).get_vocab()
    generation = GenerationConfig.from_pretrained(directory)
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 0)


def test_value_head_reloads_and_gives_the_policys_values(full_model, lora_model, tmp_path):
    for name, model in [("full", full_model), ("lora_vf_layers", lora_model)]:
        directory = export_pretrained(model, tmp_path / name)
        obs = observations(model)
        with torch.no_grad():
            expected = model.policy.predict_values(obs)
        assert expected.abs().max() > 1e-3  # the value head trained away from its zero init
        torch.testing.assert_close(exported_values(directory, obs), expected, rtol=0, atol=1e-5)
    state = load_file(str(tmp_path / "full" / VALUE_HEAD_FILE))
    assert set(state) == {"weight", "bias"}
    assert set(load_file(str(tmp_path / "lora_vf_layers" / VALUE_HEAD_FILE))) == {
        "weight", "bias", MLP_PREFIX + "0.weight", MLP_PREFIX + "0.bias"}


def test_lora_export_is_the_adapted_lm_merged(lora_model, tiny_lm, tmp_path):
    policy = lora_model.policy
    directory = export_pretrained(lora_model, tmp_path)
    weights = load_file(str(directory / "model.safetensors"))
    assert not [name for name in weights if "lora_" in name or "base_layer" in name]  # no peft layer names
    exported = AutoModelForCausalLM.from_pretrained(directory).eval()
    torch.testing.assert_close(logits(exported), logits(policy.lm), rtol=0, atol=1e-5)  # adapters on
    untrained = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    assert (logits(exported) - logits(untrained)).abs().max() > 1e-2
    assert policy.peft_model is not None and any("lora_B" in n for n, _ in policy.lm.named_parameters())  # policy keeps its adapters

    card = (directory / "README.md").read_text()
    assert "## LoRA configuration" in card and "| r | 4 |" in card and "| lora_alpha | 8 |" in card
    assert "- lora" in card


def test_pipeline_generates_from_the_export(full_model, tmp_path):
    export_pretrained(full_model, tmp_path)
    generator = pipeline("text-generation", model=str(tmp_path), device="cpu")
    # The tiny word-level tokenizer decodes without a leading space: compare the new text alone.
    out = generator("the movie was", max_new_tokens=3, do_sample=False, return_full_text=False)[0]["generated_text"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    prompt = tokenizer("the movie was", return_tensors="pt")["input_ids"]
    greedy = full_model.policy.lm.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out == tokenizer.decode(greedy[0, prompt.shape[1]:], skip_special_tokens=True)  # the policy's greedy text
    assert len(out.split()) == 3 or greedy[0, -1] == tokenizer.eos_token_id


def test_model_card_lists_base_model_algorithm_settings_and_evaluation(full_model, tiny_lm, tmp_path):
    evaluation = {name: TextEvaluation(name, 8, reward, 0.1, kl, 0.05, 12.5, 0.5, 0.75, 4.0, episodes=[])
                  for name, reward, kl in [("reference", 0.125, 0.0), ("trained", 0.625, 1.5)]}
    export_pretrained(full_model, tmp_path, evaluation=evaluation, reward_model="KeywordReward(keyword='good')",
                      training_settings={"kl_coef": 0.05, "total_timesteps": 32})
    card = (tmp_path / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front
    assert all(f"- {tag}" in front for tag in ("textgym", "reinforcement-learning", "ppo"))
    assert "base_model:" not in front  # a local directory is no hub id
    assert tiny_lm in card and "PPO" in card
    assert f"{full_model.num_timesteps:,}" in card and "KeywordReward(keyword='good')" in card
    for row in ("| learning_rate | 0.01 |", "| n_steps | 8 |", "| batch_size | 16 |", "| n_epochs | 2 |",
                "| gamma | 1 |", "| gae_lambda | 0.95 |", "| clip_range | 0.2 |", "| ent_coef | 0 |",
                "| kl_coef | 0.05 |", "| total_timesteps | 32 |"):
        assert row in card
    assert "| trained | +0.625 ± 0.100 |" in card and "| reference | +0.125 ± 0.100 |" in card
    assert "LoRA" not in card

    export_pretrained(full_model, tmp_path / "one", evaluation=evaluation["trained"], reward_model=keyword_reward)
    card = (tmp_path / "one" / "README.md").read_text()
    assert "| trained |" in card and "| reference |" not in card and "KeywordReward" in card


def test_base_model_hub_id(tmp_path):
    from agents.training.export import _hub_id
    from textgym.assets import DEFAULT_MODEL

    assert _hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _hub_id("gpt2") == "gpt2"
    assert _hub_id(DEFAULT_MODEL) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _hub_id(str(tmp_path)) is None


def test_policy_alone_exports_without_algorithm(full_model, tmp_path):
    export_pretrained(full_model.policy, tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "- ppo" not in card and "n_steps" not in card and "| value_learning_rate | 0.01 |" in card
    assert (tmp_path / VALUE_HEAD_FILE).is_file()


def test_non_transformer_policy_models_raise_type_error(tmp_path, full_model):
    cartpole = PPO("MlpPolicy", "CartPole-v1", n_steps=8, batch_size=8)
    with pytest.raises(TypeError, match="agents.TransformerPolicy.*PPO \\(policy: ActorCriticPolicy\\)"):
        export_pretrained(cartpole, tmp_path / "cartpole")
    with pytest.raises(TypeError, match="got str"):
        export_pretrained("gpt2", tmp_path / "name")
    with pytest.raises(TypeError, match="evaluation must be"):
        export_pretrained(full_model, tmp_path / "evaluation", evaluation={"trained": 0.5})
    with pytest.raises(TypeError, match="training_settings"):
        export_pretrained(full_model, tmp_path / "settings", training_settings=[("kl_coef", 0.05)])
    assert list(tmp_path.iterdir()) == []  # nothing written
