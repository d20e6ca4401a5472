"""Chat mode of TextGen-v0: rendering through the chat template, stop ids, reply-only completions."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from textgym.tiny import save_tiny_lm

QUESTIONS = ["one two", "good movie"]


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny_chat_lm"), n_positions=128, chat=True))


class RecordingReward:
    """Keyword reward that remembers what it was asked to score."""

    def __init__(self):
        self.calls: list[tuple[list[str], list[str]]] = []

    def __call__(self, prompts, completions):
        self.calls.append((list(prompts), list(completions)))
        return [float(c.split().count("good")) for c in completions]


def make_chat_env(lm: str, **kwargs):
    defaults = dict(model_name_or_path=lm, prompts=QUESTIONS, reward_model=RecordingReward(), chat_template=True,
                    max_prompt_tokens=None, max_new_tokens=4)
    return gym.make("TextGen-v0", **{**defaults, **kwargs}).unwrapped


def prompt_ids(obs) -> list[int]:
    length = obs["attention_mask"].shape[0]
    return [int(i) for i, m in zip(obs["input_ids"][:length], obs["attention_mask"]) if m]


def test_prompt_equals_apply_chat_template_token_for_token(tiny_chat_lm):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_lm)
    conversation = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                    {"role": "user", "content": "good movie"}]
    env = make_chat_env(tiny_chat_lm, prompts=[*QUESTIONS, conversation], system_prompt="very good")
    for prompt in [*QUESTIONS, conversation]:
        obs, info = env.reset(options={"prompt": prompt})
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else conversation
        messages = [{"role": "system", "content": "very good"}, *messages]
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt_ids(obs) == list(expected)
        assert info["messages"] == messages
        assert info["prompt"] == messages[-1]["content"]
    assert env.observation_space.prompt_length == max(len(ids) for ids in env._prompt_ids)
    # The window holds the system line, the question and the assistant header: "assistant" is last.
    assert prompt_ids(obs)[-2:] == tokenizer.convert_tokens_to_ids(["<|im_start|>", "assistant"])


def test_a_system_message_in_the_conversation_wins_over_system_prompt(tiny_chat_lm):
    conversation = [{"role": "system", "content": "bad"}, {"role": "user", "content": "one"}]
    env = make_chat_env(tiny_chat_lm, prompts=[conversation], system_prompt="very good")
    assert env.reset()[1]["messages"] == conversation


def test_reply_stops_at_end_of_turn_and_completion_is_the_reply_only(tiny_chat_lm):
    reward = RecordingReward()
    env = make_chat_env(tiny_chat_lm, reward_model=reward)
    tok = env.tokenizer
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert env.stop_token_ids == {im_end, eos}
    for stop in (im_end, eos):
        env.reset(options={"prompt": "one two"})
        _, r0, done0, _, _ = env.step(tok.convert_tokens_to_ids("good"))
        _, r1, done1, trunc, info = env.step(stop)
        assert (done0, done1, trunc) == (False, True, False)
        assert info["completion"] == "good" and r1 == 1.0 and info["reward_components"] == {"score": 1.0}
        assert reward.calls[-1] == (["one two"], ["good"])  # the prompt text and the reply, no template


def test_several_stop_ids(tiny_chat_lm):
    env = make_chat_env(tiny_chat_lm, chat_template=False, eos_token_id=[5, 7], max_prompt_tokens=4)
    assert env.stop_token_ids == {5, 7} and env.eos_token_id is None
    for stop in (5, 7):
        env.reset(seed=0)
        assert env.step(6)[2] is False
        _, _, terminated, _, info = env.step(stop)
        assert terminated and info["completion"].strip() == env.tokenizer.decode([6])  # " bad": continuation
    env = make_chat_env(tiny_chat_lm, eos_token_id=None)
    env.reset(seed=0)
    assert [env.step(env.tokenizer.eos_token_id)[2] for _ in range(4)] == [False, False, False, True]
    with pytest.raises(ValueError, match="token id"):
        make_chat_env(tiny_chat_lm, eos_token_id=["<eos>"])


def test_continuation_mode_stays_the_default(tiny_chat_lm):
    env = make_chat_env(tiny_chat_lm, chat_template=False, max_prompt_tokens=4)
    obs, info = env.reset(options={"prompt": "one two"})
    assert prompt_ids(obs) == env.tokenizer("one two")["input_ids"] and "messages" not in info
    assert env.stop_token_ids == {env.tokenizer.eos_token_id}


def test_bad_chat_input_fails_at_construction(tiny_chat_lm, tiny_lm):
    with pytest.raises(ValueError, match="has no chat template"):
        make_chat_env(tiny_lm)
    with pytest.raises(ValueError, match="chat_template=True"):
        make_chat_env(tiny_chat_lm, chat_template=False, prompts=[[{"role": "user", "content": "one"}]])
    with pytest.raises(ValueError, match="only used with chat_template=True"):
        make_chat_env(tiny_chat_lm, chat_template=False, system_prompt="good")
    with pytest.raises(ValueError, match="'role' and 'content'"):
        make_chat_env(tiny_chat_lm, prompts=[[{"role": "user"}]])
    with pytest.raises(ValueError, match="longer than max_prompt_tokens"):
        make_chat_env(tiny_chat_lm, max_prompt_tokens=3)


def test_named_reward_components_reach_info(tiny_chat_lm):
    def components(prompts, completions):
        good = np.array([c.count("good") for c in completions], dtype=float)
        return {"score": 2 * good + 1, "good": good}

    env = make_chat_env(tiny_chat_lm, reward_model=components)
    env.reset(seed=0)
    tok = env.tokenizer
    env.step(tok.convert_tokens_to_ids("good"))
    _, reward, _, _, info = env.step(tok.convert_tokens_to_ids("<|im_end|>"))
    assert reward == 3.0 and info["reward_components"] == {"score": 3.0, "good": 1.0}
    with pytest.raises(ValueError, match="must include 'score'"):
        make_chat_env(tiny_chat_lm, reward_model=lambda p, c: {"good": [0.0] * len(c)})


LLAMA3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("<bos>{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


@pytest.mark.parametrize(("template", "specials", "end_of_turn"), [
    (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    (GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
])
def test_end_of_turn_token_of_other_template_families(template, specials, end_of_turn):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from textgym.chat import end_of_turn_token_id

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<eos>", *specials, "user", "assistant", "model"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                        extra_special_tokens=specials)
    tokenizer.chat_template = template
    assert end_of_turn_token_id(tokenizer) == vocab[end_of_turn]
