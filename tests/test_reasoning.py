"""Verifiable rewards and reasoning-gym tasks: answer extraction, held-out split, scoring, learning."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env

from agents import TransformerPolicy, text_ppo_kwargs
from tests.conftest import TEST_SEED
from textgym.rewards.verifiable import VerifiableReward, extract_answer
from textgym.tasks.reasoning import create_dataset, reasoning_splits
from textgym.tiny import save_tiny_lm

SMALL = dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1)  # ~200 distinct questions


@pytest.mark.parametrize(("reply", "answer", "well", "source"), [
    ("<answer>42</answer>", "42", True, "tag"),
    ("The sum is <answer> 7 </answer>.", "7", True, "tag"),
    ("<answer>1</answer> no wait <answer>2</answer>", "2", False, "tag"),          # multiple: the last
    ("<answer>3</answer></answer>", "3", False, "tag"),                             # stray closing tag
    ("<answer></answer>", None, True, "tag"),                                       # empty
    ("It is <answer>12", "12", False, "open_tag"),                                  # cut off before closing
    ("</answer> 5 <answer>6", "6", False, "open_tag"),
    ("4 + 7 = 11", "11", False, "fallback"),                                        # no tags: last number
    ("It is -1,200.5, I think", "-1,200.5", False, "fallback"),
    ("I do not know", None, False, "none"),
])
def test_extract_answer(reply, answer, well, source):
    found = extract_answer(reply)
    assert (found.answer, found.well_formatted, found.source) == (answer, well, source)


def test_extract_answer_fallbacks():
    assert extract_answer(" eleven \n", fallback="reply").answer == "eleven"
    assert extract_answer("4 + 7 = 11", fallback=None).answer is None
    assert extract_answer("<answer>x</answer>", fallback=None).answer == "x"
    with pytest.raises(ValueError, match="fallback"):
        extract_answer("1", fallback="first_number")


def test_held_out_questions_are_disjoint_from_training():
    splits = reasoning_splits("chain_sum", SMALL, train_size=600, test_size=100)
    train, test = {e["question"] for e in splits.train}, {e["question"] for e in splits.test}
    assert train and test and not train & test
    # The filter is doing work: the unfiltered training stream repeats held-out questions.
    raw = create_dataset("chain_sum", 600, 0, SMALL)
    assert len(splits.train) < len(raw) and any(raw[i]["question"] in test for i in range(len(raw)))
    with pytest.raises(ValueError, match="too few distinct questions"):
        reasoning_splits("chain_sum", dict(SMALL, allow_negation=False), train_size=5, test_size=2000)


def test_reward_equals_the_datasets_score_answer():
    splits = reasoning_splits("chain_sum", SMALL, train_size=50, test_size=50)
    entries = splits.entries_by_question
    reward = VerifiableReward(entries, splits.dataset.score_answer, format_weight=0.25)
    prompts, replies, expected_correct = [], [], []
    for entry in splits.test[:10]:
        wrong = str(int(entry["answer"]) + 1)
        for reply, answer in ((f"<answer>{entry['answer']}</answer>", entry["answer"]),
                              (f"so it is {wrong}", wrong),
                              (f"<answer>+0{entry['answer']}.00</answer>", f"+0{entry['answer']}.00")):
            prompts.append(entry["question"])
            replies.append(reply)
            expected_correct.append(splits.dataset.score_answer(answer, entries[entry["question"]]))
    out = reward(prompts, replies)
    np.testing.assert_array_equal(out["correct"], expected_correct)
    assert out["correct"][0::3].tolist() == [1.0] * 10 and out["correct"][1::3].tolist() == [0.0] * 10
    np.testing.assert_array_equal(out["format"], [1.0, 0.0, 1.0] * 10)
    np.testing.assert_array_equal(out["score"], out["correct"] + 0.25 * out["format"])
    with pytest.raises(ValueError, match="no entry"):
        reward(["not a question"], ["1"])


def test_bad_task_or_config_names_the_fix():
    with pytest.raises(ValueError, match=r"unknown reasoning-gym task 'chain_sums'.*basic_arithmetic.*chain_sum"):
        create_dataset("chain_sums", 2, 0)
    with pytest.raises(ValueError, match=r"rejected task_config.*max_terms"):
        create_dataset("chain_sum", 2, 0, {"max_term": 3})
    with pytest.raises(ValueError, match="rejected task_config"):
        create_dataset("chain_sum", 2, 0, {"min_terms": 5, "max_terms": 2})


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("tiny_chat_lm"), n_positions=128, chat=True))


def test_reasoning_env_on_a_tiny_chat_model(tiny_chat_lm):
    kwargs = dict(task="chain_sum", task_config=SMALL, model_name_or_path=tiny_chat_lm, train_size=200, test_size=50,
                  max_new_tokens=3)
    train, test = gym.make("TextGen-Reasoning-v0", **kwargs), gym.make("TextGen-Reasoning-v0", split="test", **kwargs)
    assert train.observation_space == test.observation_space  # one policy serves both splits
    assert not set(train.unwrapped.prompts) & set(test.unwrapped.prompts)
    _, info = test.reset(seed=0)
    assert info["messages"][0]["role"] == "system" and "<answer>" in info["messages"][0]["content"]
    im_end = train.unwrapped.tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, reward, terminated, truncated, info = test.step(im_end)
    assert (reward, terminated, truncated) == (0.0, True, False)
    assert info["reward_components"] == {"score": 0.0, "correct": 0.0, "format": 0.0}


NUMBERS = ("one", "two", "three", "four", "five", "six")


@pytest.mark.learning
def test_tiny_model_learns_a_verifiable_task(tiny_chat_lm, record_property):
    """Answer each number word with the next one, in chat mode: a one-token reply checked exactly.

    Chance: a uniformly random reply token is the right word with probability 1 / vocab (0.042
    for the tiny chat LM's 24 tokens); the untrained tiny LM is close to uniform. After 3,000
    steps (about 3 s) sampled replies must be right more than half the time, twelve times chance
    (seed 0 reached 0.975).
    """
    answers = dict(zip(NUMBERS[:-1], NUMBERS[1:]))
    reward = VerifiableReward(answers, lambda answer, expected: float(answer == expected), fallback="reply")
    env_kwargs = dict(model_name_or_path=tiny_chat_lm, prompts=list(answers), reward_model=reward, chat_template=True,
                      max_prompt_tokens=None, max_new_tokens=1)
    env = make_vec_env("TextGen-v0", n_envs=4, seed=TEST_SEED, env_kwargs=env_kwargs)
    chance = 1 / env.action_space.n
    model = PPO(TransformerPolicy, env, seed=TEST_SEED,
                **text_ppo_kwargs(learning_rate=1e-3, n_steps=32, batch_size=32, normalize_advantage=False))
    model.learn(3_000)
    obs, rewards = env.reset(), []
    while len(rewards) < 200:
        obs, r, dones, _ = env.step(model.predict(obs, deterministic=False)[0])
        rewards.extend(r[dones])
    record_property("figure", np.mean(rewards))
    assert chance < 0.05 and np.mean(rewards) > 0.5
