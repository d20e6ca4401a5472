"""Multi-turn dialogue envs: the chat layout, episode ends, and that the game's tokens are never actions
(KV cache, grouped update, KL and learning checked against direct computations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from transformers import AutoModelForCausalLM

from agents import TransformerPolicy, evaluate_against_reference, text_ppo_kwargs
from agents.algorithms.kl import reference_log_probs
from agents.policy import kv_cache as kv_cache_module
from agents.policy.kv_cache import appended_tokens
from tests.conftest import seeded_runs
from textgym.chat import render_chat
from textgym.dialogue import DialogueEnv, DialogueGame
from textgym.rendering import text_frame
from textgym.tasks.recall import RecallGame
from textgym.tiny import save_tiny_lm

END = 4  # <|im_end|> of the tiny chat tokenizer


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory) -> str:
    return str(save_tiny_lm(tmp_path_factory.mktemp("dialogue_lm"), chat=True))


def env_kwargs(lm: str, **overrides) -> dict:
    return {"game": RecallGame(), "model_name_or_path": lm, "max_prompt_tokens": 8, "max_context_tokens": 16,
            "max_reply_tokens": 2, **overrides}


class Countdown(DialogueGame):
    """Counts replies; answers "one" each time; over after ``turns`` replies; rewards 0.5 per turn."""

    def __init__(self, turns: int = 3):
        self.turns = turns

    def reset(self, seed=None):
        self.replies = []
        return "the film"

    def respond(self, reply):
        self.replies.append(reply)
        return "one", 0.5, len(self.replies) >= self.turns


def real_tokens(obs) -> list[int]:
    return [int(i) for i, m in zip(obs["input_ids"], obs["attention_mask"]) if m]


def test_observation_is_the_chat_template_rendering_of_the_conversation(chat_lm):
    env = DialogueEnv(**env_kwargs(chat_lm, game=Countdown(turns=3), max_context_tokens=24))
    tok = env.tokenizer
    good, bad = tok.convert_tokens_to_ids(["good", "bad"])
    obs, info = env.reset(seed=0)
    assert real_tokens(obs) == render_chat(tok, [{"role": "user", "content": "the film"}])
    # Turn 1 ends with the end-of-turn token; turn 2 is cut by max_reply_tokens=2 (the env closes it).
    for action in (good, END, bad, good):
        obs, reward, terminated, truncated, info = env.step(action)
    expected = render_chat(tok, [{"role": "user", "content": "the film"}, {"role": "assistant", "content": "good"},
                                 {"role": "user", "content": "one"}, {"role": "assistant", "content": "bad good"},
                                 {"role": "user", "content": "one"}])
    assert real_tokens(obs) == expected
    assert info["reply"] == "bad good" and info["turn"] == 2 and reward == 0.5 and not (terminated or truncated)


def test_rewards_per_turn_and_episode_ends(chat_lm):
    env = DialogueEnv(**env_kwargs(chat_lm, game=Countdown(turns=2)))
    good = env.tokenizer.convert_tokens_to_ids("good")
    env.reset(seed=0)
    steps = [env.step(a) for a in (good, good, good, END)]
    assert [s[1] for s in steps] == [0.0, 0.5, 0.0, 0.5]  # the turn's reward at its last token
    assert [s[2] for s in steps] == [False, False, False, True] and not any(s[3] for s in steps)
    final = steps[-1][4]
    assert final["completion"] == "good good\ngood" and [m["role"] for m in final["messages"]] == [
        "user", "assistant", "user", "assistant"]
    with pytest.raises(RuntimeError, match="reset"):
        env.step(good)

    # The game would go on: truncated by the turn limit, or when the next answer does not fit the window.
    env = DialogueEnv(**env_kwargs(chat_lm, game=Countdown(turns=10), max_turns=2))
    env.reset(seed=0)
    ends = [env.step(END)[2:4] for _ in range(2)]
    assert ends == [(False, False), (False, True)]
    env = DialogueEnv(**env_kwargs(chat_lm, game=Countdown(turns=10), max_context_tokens=12))
    env.reset(seed=0)
    ends = [env.step(END)[2:4] for _ in range(2)]  # each turn appends 1 reply token + 6 context tokens
    assert ends == [(False, False), (False, True)]


def test_bad_games_and_windows_fail_at_construction(chat_lm, tiny_lm):
    with pytest.raises(TypeError, match="DialogueGame"):
        DialogueEnv(**env_kwargs(chat_lm, game="GuessTheNumber-v0"))
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        DialogueEnv(**env_kwargs(chat_lm, max_prompt_tokens=4))
    with pytest.raises(ValueError, match="chat template"):
        DialogueEnv(**env_kwargs(tiny_lm))

    class Silent(Countdown):
        def respond(self, reply):
            return None, 0.0, False

    env = DialogueEnv(**env_kwargs(chat_lm, game=Silent()))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="no message"):
        env.step(END)


def test_unseeded_envs_do_not_share_their_games(chat_lm):
    envs = [DialogueEnv(**env_kwargs(chat_lm)) for _ in range(2)]
    seeds = []
    for env in envs:
        env.reset()
        seeds.append(int(env.np_random.integers(2**62)))
    assert seeds[0] != seeds[1]  # construction did not seed np_random: each env draws its own games


def test_vectorised_envs_get_their_own_game(chat_lm):
    game = RecallGame()
    env = make_vec_env(DialogueEnv, n_envs=2, seed=0, env_kwargs=env_kwargs(chat_lm, game=game))
    games = [e.unwrapped.game for e in env.envs]
    assert games[0] is not games[1] and game not in games


def test_rgb_array_frame_draws_the_ansi_text(chat_lm):
    ansi, rgb = (DialogueEnv(**env_kwargs(chat_lm, render_mode=mode)) for mode in ("ansi", "rgb_array"))
    for env in (ansi, rgb):
        env.reset(seed=0)
        env.step(5)
    frame = rgb.render()
    assert frame.shape == (360, 640, 3) and np.array_equal(frame, text_frame(ansi.render()))


def make_ppo(lm: str, n_envs: int = 3, **kwargs) -> PPO:
    env = make_vec_env(DialogueEnv, n_envs=n_envs, seed=0, env_kwargs=env_kwargs(lm, max_reply_tokens=3))
    return PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(**{"n_steps": 12, "batch_size": 12, **kwargs}))


def test_kv_cache_extends_rows_by_the_games_tokens_exactly(chat_lm, monkeypatch):
    model = make_ppo(chat_lm, n_envs=3)
    policy, cache, env = model.policy, model.policy.rollout_cache, model.env
    policy.set_training_mode(False)
    encoded: list[int] = []
    real_encode = kv_cache_module.RolloutKVCache._encode
    monkeypatch.setattr(kv_cache_module.RolloutKVCache, "_encode",
                        lambda self, rows, ids, mask: encoded.append(len(rows)) or real_encode(self, rows, ids, mask))
    rng = np.random.default_rng(0)
    obs, previous, multi_token_steps = env.reset(), None, 0
    dones = np.ones(env.num_envs, dtype=bool)
    for _ in range(40):
        obs_t = {k: torch.as_tensor(v) for k, v in obs.items()}
        encoded.clear()
        with torch.no_grad():
            torch.testing.assert_close(cache.features(obs_t["input_ids"], obs_t["attention_mask"]),
                                       policy.extract_features(obs_t), rtol=0, atol=1e-5)
        # Rows are re-encoded only at new episodes, never when the game answered.
        assert sum(encoded) == dones.sum()
        if previous is not None:
            multi_token_steps += int((appended_tokens(*previous, obs_t["input_ids"], obs_t["attention_mask"]) > 1).sum())
        previous = obs_t["input_ids"], obs_t["attention_mask"]
        actions = rng.integers(5, env.action_space.n, size=env.num_envs)
        actions[rng.random(env.num_envs) < 0.4] = END
        obs, _, dones, _ = env.step(actions)
    # Built by the game, whatever the actions: a RecallGame episode is two replies of at most 3
    # tokens, so each env starts an episode at least every 6 steps and its first reply ends within
    # 3 tokens; in 39 steps each env sees at least 7 answers (exactly 7 with no END at all).
    assert multi_token_steps >= 3 * 7


def test_update_and_kl_count_only_the_agents_tokens(chat_lm):
    model = make_ppo(chat_lm, n_envs=2, n_steps=16, batch_size=16)
    model.learn(32)
    buffer = model.rollout_buffer
    batch = next(buffer.get(batch_size=None))
    obs, actions = batch.observations, batch.actions.long().flatten()
    policy = model.policy
    results = {}
    for grouped in (True, False):
        policy.share_prefix_forward = grouped
        with torch.no_grad():
            results[grouped] = policy.evaluate_actions(obs, actions)
    for got, expected in zip(results[True], results[False]):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # Reference log-probs (one forward per episode) equal a direct forward of each transition's own
    # observation: every stored action is an agent token, scored where the agent wrote it.
    reference = AutoModelForCausalLM.from_pretrained(chat_lm).eval()
    ids, mask = obs["input_ids"], obs["attention_mask"]
    ref = reference_log_probs(reference, ids, mask, actions)
    with torch.no_grad():
        for row in range(len(actions)):
            logits = reference(ids[row][mask[row].bool()][None]).logits[0, -1]
            assert abs(float(torch.log_softmax(logits, -1)[actions[row]]) - float(ref[row])) < 1e-5
    # The game's tokens are context, not transitions: within an env's run, a window grows by more
    # than one token from one transition to the next when a turn ended. Whatever is sampled, each
    # env's 16 steps hold at least 3 such answers (an episode at least every 6 steps, its first
    # reply over within 3 tokens).
    lengths = mask.sum(-1).reshape(buffer.n_envs, buffer.buffer_size)
    assert (((lengths[:, 1:] - lengths[:, :-1]) > 1).sum(1) >= 3).all()


def test_evaluation_counts_the_agents_tokens_only(chat_lm):
    model = make_ppo(chat_lm, n_envs=2)
    env = make_vec_env(DialogueEnv, n_envs=2, env_kwargs=env_kwargs(chat_lm, max_reply_tokens=3))
    results = evaluate_against_reference(model, env, n_episodes=6, verbose=False, kv_cache=True)
    for sample in results["trained"].episodes:
        replies = sample.completion.split("\n")
        assert len(replies) == 2 and 2 <= len(sample.tokens) <= 6  # two replies of 1-3 tokens each
        assert len(sample.log_probs) == len(sample.ref_log_probs) == len(sample.tokens)
    assert results["reference"].kl_mean == 0.0


def train_on_recall(chat_lm: str, seed: int) -> tuple[float, float]:
    """PPO on RecallGame from ``seed``: (sampled win rate before training, greedy win rate after),
    each over the same 200 held-out games."""
    kwargs = env_kwargs(chat_lm)
    env = make_vec_env(DialogueEnv, n_envs=8, seed=seed, env_kwargs=kwargs)
    model = PPO(TransformerPolicy, env, seed=seed, **text_ppo_kwargs(
        n_steps=32, batch_size=64, n_epochs=4, learning_rate=1e-3, ent_coef=0.1, gamma=1.0))

    def win_rate(deterministic: bool, n: int = 200) -> float:
        play = DialogueEnv(**kwargs)
        wins = []
        for i in range(n):
            obs, _ = play.reset(seed=seed + 10_000 + i)
            done = False
            while not done:
                action, _ = model.predict(obs, deterministic=deterministic)
                obs, reward, terminated, truncated, _ = play.step(action)
                done = terminated or truncated
            wins.append(reward)
        return float(np.mean(wins))

    before = win_rate(deterministic=False)
    model.learn(20_000)
    return before, win_rate(deterministic=True)


@pytest.mark.learning
def test_ppo_learns_to_read_the_games_answer(chat_lm, record_property):
    """RecallGame: a policy that ignores the game's answer wins at most half the games; one whose
    greedy replies (``deterministic=True``, as SB3's ``evaluate_policy``) win more than 0.65 of 200
    held-out games reads it (a blind policy gets there with odds below 1e-5).

    One seeded run learns on 15 of 16 seeds (``docs/testing.md``; the other reached 0.515), so
    the test runs up to three independently seeded runs and passes when one of them learns: at the
    measured 1/16 per run it fails with odds 1/16**3 = 2.4e-4, and it costs one run 15 times in
    16. The figure recorded for the seed sweep is the first run's. The former setup (learning rate
    3e-3, entropy coefficient 0.01, 16,000 steps, sampled replies against 0.8) learned on 7 of 16
    seeds: the others settled on one word (win rate ~0.5) before reading the answer; a lower
    learning rate with a larger entropy bonus keeps both words in play.
    """
    results = seeded_runs(lambda seed: train_on_recall(chat_lm, seed), lambda result: result[1] > 0.65)
    record_property("figure", results[0][1])
    record_property("runs", len(results))
    assert all(before < 0.2 for before, _ in results), results  # the untrained policy does not read it
    assert results[-1][1] > 0.65, f"(sampled before, greedy after) per run: {results}; ignoring the answer gives at most 0.5"
