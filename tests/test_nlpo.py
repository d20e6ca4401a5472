"""NLPO on sb3-contrib's MaskablePPO: learning, exact masks in the update, compact storage, refresh timing."""

from __future__ import annotations

import math
from collections import Counter

import gymnasium as gym
import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.buffers import MaskableDictRolloutBuffer
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env

from agents import EpisodeRolloutBuffer, KLPenaltyCallback, TransformerPolicy, text_ppo_kwargs
from agents.policy.kv_cache import RolloutKVCache
from agents.algorithms.nlpo import (NUCLEUS_CANDIDATES, MaskableEpisodeRolloutBuffer, MaskableTransformerPolicy, NLPOCallback,
                         nlpo_kwargs, nucleus_mask)
from tests.conftest import mean_reward, seeded_runs
from tests.scripted import script_stops
from textgym.spaces import TokenWindowSpace
from textgym.tasks.synthetic import TASKS

KEYWORD = TASKS["keyword"]
EOS, GOOD = 2, 3  # token ids of the synthetic tasks' tiny tokenizer: <pad> <unk> <eos> good one .. six
VOCAB = 10


def make_nlpo(n_envs: int = 8, n_steps: int = 32, wrapper_class=None, seed: int = 0, env_kwargs=None,
              **overrides) -> MaskablePPO:
    env = make_vec_env(KEYWORD.gym_id, n_envs=n_envs, seed=seed, wrapper_class=wrapper_class, env_kwargs=env_kwargs)
    kwargs = {**KEYWORD.ppo_kwargs, "n_steps": n_steps, **overrides}
    return MaskablePPO(MaskableTransformerPolicy, env, seed=seed, **nlpo_kwargs(**kwargs))


def record_rollout_and_update(model: MaskablePPO) -> tuple[list, list]:
    """Wrap the policy: every rollout ``forward`` and every ``evaluate_actions`` call, with its masks."""
    policy, rollout, update = model.policy, [], []
    forward, evaluate = policy.forward, policy.evaluate_actions

    def recording_forward(obs, deterministic=False, action_masks=None):
        actions, values, log_probs = forward(obs, deterministic, action_masks)
        rollout.append((obs, actions, policy.last_action_masks.clone()))
        return actions, values, log_probs

    def recording_evaluate(obs, actions, action_masks=None):
        values, log_probs, entropy = evaluate(obs, actions, action_masks)
        update.append((obs, actions, action_masks.clone(), log_probs.detach()))
        return values, log_probs, entropy

    policy.forward, policy.evaluate_actions = recording_forward, recording_evaluate
    return rollout, update


def transitions(records) -> Counter:
    """Multiset of (observation, action, mask) rows of recorded calls, as bytes."""
    rows = Counter()
    for obs, actions, masks, *_ in records:
        for i in range(len(actions)):
            rows[(obs["input_ids"][i].long().numpy().tobytes(), obs["attention_mask"][i].long().numpy().tobytes(),
                  int(actions[i]), masks[i].numpy().tobytes())] += 1
    return rows


class NucleusSizes(BaseCallback):
    """The mean number of tokens in the sampling nucleus over each rollout (``allowed_counts``)."""

    def __init__(self):
        super().__init__()
        self.means: list[float] = []

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.means.append(float(self.model.rollout_buffer.allowed_counts().mean()))


def train_nlpo_on_the_keyword_task(seed: int) -> dict:
    """One seeded run of the NLPO learning test: 4,096 steps; the figures it asserts."""
    model = make_nlpo(policy_kwargs=dict(top_p=0.9, target_update_iterations=4), seed=seed)
    before = mean_reward(model)
    nucleus = NucleusSizes()
    model.learn(4096, callback=[NLPOCallback(), nucleus], use_masking=False)
    return dict(before=before, after=mean_reward(model), refreshes=model.policy.masking_refreshes,
                nucleus=nucleus.means)


def nlpo_learned(run: dict) -> bool:
    return run["after"] > 0.9


@pytest.mark.learning
def test_nlpo_learns_the_keyword_task(record_property):
    """Measured (seed 0): 0.082 before; 1.0 after 4,096 steps (16 rollouts, 4 s on one thread); chance 0.086.

    A run must score > 0.9 after training. One run did on 98 of 99 seeds (0-15, 100-139, 858,
    960-999; the lowest passing figure 0.902, seed 972) and reached 0.760 under CI's seed 992. So up
    to three seeded runs are made and one must pass: at 1 in 99 per run, the test fails with odds
    of about (1/99)^3 = 1e-6 per CI run.

    The last 4 rollouts sample from the masking policy refreshed at update 12. Over the 59 seeds its
    nucleus held 2.0-2.4 of the 10 tokens on 58 and 6.1 on seed 858, a slower learner (the first
    rollout's: 9.0-9.2 on every seed); the bound, 1 token fewer than the first rollout's, fails only
    if the policy at update 12 is nearly as flat as the pretrained one while the final policy still
    scores > 0.9. (A bound of 3 tokens failed CI under seed 858.)
    """
    runs = seeded_runs(train_nlpo_on_the_keyword_task, nlpo_learned)
    record_property("figure", runs[0]["after"])
    record_property("runs", len(runs))
    run = runs[-1]
    assert run["before"] < KEYWORD.chance + 0.1
    assert nlpo_learned(run), [f"NLPO: {r['before']:.3f} -> {r['after']:.3f}" for r in runs]
    assert run["refreshes"] == [0, 4, 8, 12]
    # The masking policy learned too: the nucleus it samples from shrank.
    assert len(run["nucleus"]) == 16 and run["nucleus"][0] > 8, run["nucleus"]
    assert run["nucleus"][-1] < run["nucleus"][0] - 1, run["nucleus"]


def test_without_the_nucleus_maskable_ppo_trains_exactly_as_ppo():
    """top_p=1.0 turns NLPO off: MaskablePPO with this policy and buffer then is SB3's PPO with TransformerPolicy."""
    env = make_vec_env(KEYWORD.gym_id, n_envs=4, seed=0)
    ppo = PPO(TransformerPolicy, env, seed=0, **text_ppo_kwargs(**{**KEYWORD.ppo_kwargs, "n_steps": 16}))
    initial = {name: tensor.clone() for name, tensor in ppo.policy.state_dict().items()}
    ppo.learn(128)
    assert not all(torch.equal(initial[name], tensor) for name, tensor in ppo.policy.state_dict().items())
    masked = make_nlpo(n_envs=4, n_steps=16, policy_kwargs=dict(top_p=1.0))
    masked.learn(128, callback=NLPOCallback(), use_masking=False)
    assert masked.policy.masking_lm is None and masked.policy.masking_refreshes == []
    expected = ppo.policy.state_dict()
    for name, tensor in masked.policy.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5, msg=name)
    np.testing.assert_array_equal(masked.rollout_buffer.actions, ppo.rollout_buffer.actions)


def test_update_sees_exactly_the_rollout_masks():
    model = make_nlpo(n_envs=4, n_steps=16, n_epochs=2, target_kl=None, policy_kwargs=dict(top_p=0.5))
    rollout, update = record_rollout_and_update(model)
    model.learn(64, callback=NLPOCallback(), use_masking=False)
    first_epoch, seen = [], 0
    for record in update:
        if seen < 64:
            first_epoch.append(record)
            seen += len(record[1])
    assert seen == 64 and len(rollout) == 16
    assert transitions(first_epoch) == transitions(rollout)
    masks = torch.cat([m for _, _, m in rollout])
    # Built, whatever the weights or the tokens sampled: the 5 most likely of 10 tokens hold at least
    # half the mass, so a top_p=0.5 nucleus has at most 5 tokens, and with EOS at most 6 are allowed.
    assert ((~masks).sum(-1) >= 4).all(), "top_p=0.5 of 10 tokens must mask at least 4 in every step"


def test_ratio_is_one_at_the_first_minibatch_of_every_update():
    """Stored log-probs (KV-cached rollout) equal evaluate_actions' (one forward per episode) under the same masks."""
    model = make_nlpo(n_envs=4, n_steps=16, target_kl=None, policy_kwargs=dict(top_p=0.5, target_update_iterations=1))
    _, update = record_rollout_and_update(model)
    samples, get = [], model.rollout_buffer.get

    def recording_get(batch_size=None):
        for sample in get(batch_size):
            samples.append(sample)
            yield sample

    model.rollout_buffer.get = recording_get

    class FirstMinibatch(BaseCallback):
        def _on_step(self):
            return True

        def _on_rollout_start(self):
            samples.clear()
            update.clear()

    callback = [FirstMinibatch(), NLPOCallback()]
    for _ in range(3):
        model.learn(64, callback=callback, use_masking=False, reset_num_timesteps=False)
        first_sample, first_log_probs = samples[0], update[0][3]
        assert torch.equal(update[0][2], first_sample.action_masks)
        gap = (first_log_probs - first_sample.old_log_prob).abs().max().item()
        assert gap < 1e-5, f"log-prob gap {gap}"
    assert model.policy.masking_refreshes == [0, 1, 2]


def policy_inputs(model: MaskablePPO, n_steps: int = 3) -> dict[str, torch.Tensor]:
    """Observations of a few random steps of the model's envs, as tensors."""
    env, batches = model.env, []
    obs = env.reset()
    for _ in range(n_steps):
        batches.append(obs)
        obs, *_ = env.step(np.random.default_rng(0).integers(3, VOCAB, size=env.num_envs))
    return {key: torch.as_tensor(np.concatenate([b[key] for b in batches])) for key in batches[0]}


def expected_nucleus(lm, ids: torch.Tensor, mask: torch.Tensor, top_p: float) -> set[int]:
    """The nucleus by hand: the LM alone on the unpadded text, most likely tokens until top_p is reached."""
    with torch.no_grad():
        probs = torch.softmax(lm(ids[mask == 1][None]).logits[0, -1], -1).tolist()
    kept, mass = set(), 0.0
    for token in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept.add(token)
        mass += probs[token]
    return kept


def test_masked_tokens_have_zero_probability_and_stop_tokens_stay_allowed():
    top_p = 0.3
    model = make_nlpo(n_envs=4, policy_kwargs=dict(top_p=top_p))
    policy = model.policy
    obs = policy_inputs(model)
    masks = policy.allowed_tokens(obs)
    probs = policy.get_distribution(obs).distribution.probs.detach()
    eos_outside_nucleus = 0
    for row in range(len(masks)):
        nucleus = expected_nucleus(policy.masking_lm, obs["input_ids"][row], obs["attention_mask"][row], top_p)
        assert set(masks[row].nonzero().flatten().tolist()) == nucleus | {EOS}
        eos_outside_nucleus += EOS not in nucleus
    # No sampling decides this premise: the observations are scripted, the nucleus is the LM's. EOS
    # lies outside 5 of the 12 nuclei, 0.06 to 0.5 of probability mass past top_p (measured).
    assert eos_outside_nucleus > 0, "no row tests the stop token (every nucleus held EOS)"
    assert torch.all(probs[~masks] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)), rtol=0, atol=1e-6)
    torch.manual_seed(0)
    sampled = policy.get_distribution(obs).distribution.sample((500,))  # (500, B)
    assert masks.gather(1, sampled.T).all()


def test_nucleus_of_a_large_vocabulary_equals_a_full_sort():
    """The topk shortcut (peaked rows) and the full sort (flat rows, min_tokens_to_keep) give one set."""
    torch.manual_seed(0)
    logits = torch.randn(6, 49_152) * torch.tensor([8.0, 8.0, 4.0, 0.5, 0.1, 0.0])[:, None]
    logits[0, 7] = -torch.inf
    for top_p, keep in [(0.9, 1), (0.5, 1), (0.999, 1), (0.9, 2_000)]:
        probs = torch.softmax(logits, -1)
        sorted_probs, order = probs.sort(-1, descending=True)
        before = torch.cat([torch.zeros(6, 1), sorted_probs.cumsum(-1)[:, :-1]], dim=-1)
        kept = (before < top_p) | (torch.arange(49_152) < keep)
        expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, kept)
        got = nucleus_mask(logits, top_p, keep)
        assert torch.equal(got, expected), (top_p, keep, (got != expected).sum().item())
    sizes = nucleus_mask(logits, 0.9).sum(-1).tolist()
    assert sizes[0] < NUCLEUS_CANDIDATES < sizes[4], sizes  # both paths were taken


class ForbidGoodAndEos(gym.Wrapper):
    """An env whose action_masks() forbid "good" and EOS, for sb3-contrib's use_masking."""

    def action_masks(self) -> np.ndarray:
        mask = np.ones(VOCAB, dtype=bool)
        mask[[GOOD, EOS]] = False
        return mask


def test_env_masks_combine_with_the_nucleus_and_override_stop_tokens():
    model = make_nlpo(n_envs=4, n_steps=8, wrapper_class=ForbidGoodAndEos, policy_kwargs=dict(top_p=0.5))
    model.learn(32, callback=NLPOCallback(), use_masking=True)
    buffer = model.rollout_buffer  # flattened by the update
    masks = np.unpackbits(buffer.action_mask_bits, axis=-1, count=VOCAB).astype(bool)
    assert not masks[:, [GOOD, EOS]].any()
    # Built: a top_p=0.5 nucleus of 10 tokens has at most 5 (see above), fewer than the env's 8.
    assert (masks.sum(-1) < VOCAB - 2).all(), "the nucleus should mask more than the env does"
    assert not np.isin(buffer.actions, [GOOD, EOS]).any()
    obs = model.env.reset()
    only_five = np.zeros((4, VOCAB), dtype=bool)
    only_five[:, 5] = True
    actions, _ = model.predict(obs, action_masks=only_five)  # outside the nucleus: the env's mask wins
    assert actions.tolist() == [5, 5, 5, 5]


def test_mask_storage_is_one_bit_per_token():
    space = TokenWindowSpace(vocab_size=49_152, prompt_length=16, max_new_tokens=32)
    action_space = gym.spaces.Discrete(49_152)
    ours = MaskableEpisodeRolloutBuffer(32, space, action_space, n_envs=8)
    episode = EpisodeRolloutBuffer(32, space, action_space, n_envs=8)
    contrib = MaskableDictRolloutBuffer(32, space, action_space, n_envs=8)
    assert ours.bytes_per_transition - episode.bytes_per_transition == 6_144 == 49_152 / 8
    assert contrib.action_masks.nbytes / (32 * 8) == 196_608 == 32 * 6_144
    assert not hasattr(ours, "action_masks")

    model = make_nlpo(n_envs=2, n_steps=8)
    model.learn(16, callback=NLPOCallback(), use_masking=False)
    tiny = EpisodeRolloutBuffer(8, model.observation_space, model.action_space, n_envs=2)
    assert model.rollout_buffer.bytes_per_transition - tiny.bytes_per_transition == 2  # ceil(10 / 8)


class Events(BaseCallback):
    """Records rollout starts and ends, refreshes and updates, in order, and the masking LM's state at each update."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        self.masking_equals_policy: list[bool] = []

    def _init_callback(self):
        if self.events:  # a later learn() call: wrapped already
            return
        policy, train, refresh = self.model.policy, self.model.train, self.model.policy._copy_into_masking_lm

        def recording_train():
            self.events.append("update")
            self.masking_equals_policy.append(all(
                torch.equal(m, p) for m, p in zip(policy.masking_lm.parameters(), policy.lm.parameters())))
            train()

        def recording_refresh():
            self.events.append("refresh")
            refresh()

        self.model.train, policy._copy_into_masking_lm = recording_train, recording_refresh

    def _on_step(self):
        return True

    def _on_rollout_start(self):
        self.events.append("start")

    def _on_rollout_end(self):
        self.events.append("end")


def test_masking_policy_refreshes_every_n_rollouts_and_never_between_a_rollout_and_its_update():
    model = make_nlpo(n_envs=2, n_steps=8, policy_kwargs=dict(target_update_iterations=2))
    events = Events()
    callback = [events, NLPOCallback()]  # Events first: its "start" precedes the refresh of the same rollout
    model.learn(3 * 16, callback=callback, use_masking=False)
    model.learn(2 * 16, callback=callback, use_masking=False, reset_num_timesteps=False)
    refreshed, plain = ["start", "refresh", "end", "update"], ["start", "end", "update"]
    assert events.events == refreshed + plain + refreshed + plain + refreshed
    assert model.policy.masking_refreshes == [0, 2, 4]
    # Right after a refresh the masking LM is the policy; one update later it is not.
    assert events.masking_equals_policy == [True, False, True, False, True]


def test_lora_masking_copy_shares_the_frozen_base_and_copies_the_adapters():
    lora = dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    model = make_nlpo(n_envs=2, n_steps=8, policy_kwargs=dict(lora_config=lora, target_update_iterations=2))
    policy = model.policy
    params = dict(policy.lm.named_parameters())
    shared = [name for name, p in policy.masking_lm.named_parameters() if p is params[name]]
    copied = [name for name, p in policy.masking_lm.named_parameters() if p is not params[name]]
    assert shared == [name for name, p in params.items() if not p.requires_grad]
    assert copied and all("lora_" in name for name in copied)
    kl = KLPenaltyCallback(0.1)  # reference: the policy's own LM with its adapters disabled
    model.learn(2 * 16, callback=[NLPOCallback(), kl], use_masking=False)
    assert kl.reference is None and math.isfinite(kl.stats["kl/episode_kl"])
    trained = [name for name in copied if not torch.equal(dict(policy.masking_lm.named_parameters())[name],
                                                          params[name])]
    assert trained, "the adapters trained, the masking copy (refreshed at rollout 0 only) did not follow"
    policy.start_rollout()  # rollout 2: refresh
    assert all(torch.equal(p, params[name]) for name, p in policy.masking_lm.named_parameters())


def test_kl_penalty_uses_the_masked_log_prob_against_the_unmasked_reference():
    """At the first rollout the policy is the reference, so each token's KL is -log pi(allowed tokens) >= 0.
    Without a stop token episodes are 4 tokens: 12 of the 14 steps checked carry no keyword score."""
    model = make_nlpo(n_envs=2, n_steps=8, policy_kwargs=dict(top_p=0.5), env_kwargs=dict(eos_token_id=None))
    kept = {}

    class Keep(BaseCallback):
        def _on_step(self):
            return True

        def _on_rollout_end(self):
            buffer = self.model.rollout_buffer
            kept.update(rewards=buffer.rewards.copy(), log_probs=buffer.log_probs.copy(),
                        starts=buffer.episode_starts.copy(), obs={k: v.copy() for k, v in buffer.observations.items()},
                        masks=np.unpackbits(buffer.action_mask_bits, axis=-1, count=VOCAB).astype(bool))

    model.learn(16, callback=[NLPOCallback(), KLPenaltyCallback(1.0), Keep()], use_masking=False)
    lm, checked = model.policy.masking_lm, 0  # refreshed at rollout 0: the weights the rollout sampled with
    for t in range(7):
        for env in range(2):
            if kept["starts"][t + 1, env]:  # the last step of an episode also carries the keyword score
                continue
            ids = torch.as_tensor(kept["obs"]["input_ids"][t, env].astype(np.int64))
            mask = torch.as_tensor(kept["obs"]["attention_mask"][t, env].astype(np.int64))
            with torch.no_grad():
                probs = torch.softmax(lm(ids[mask == 1][None]).logits[0, -1], -1)
            allowed_mass = probs[torch.as_tensor(kept["masks"][t, env])].sum().item()
            assert kept["rewards"][t, env] == pytest.approx(math.log(allowed_mass), abs=1e-5)
            assert allowed_mass < 0.99  # the premise: the mask cuts mass (this near-uniform LM spreads it over all 10 tokens)
            checked += 1
    assert checked == 12


@pytest.mark.parametrize(("policy_kwargs", "match"), [
    (dict(top_p=0.0), r"top_p=0\.0: .* top_p=0\.9"),
    (dict(top_p=1.5), r"top_p=1\.5: .* top_p=1\.0 to turn"),
    (dict(top_p=-0.2), r"top_p=-0\.2"),
    (dict(target_update_iterations=0), r"target_update_iterations=0: must be an integer >= 1"),
    (dict(target_update_iterations=2.5), r"target_update_iterations=2\.5"),
    (dict(min_tokens_to_keep=0), r"min_tokens_to_keep=0"),
    (dict(stop_token_ids=[2, 10]), r"stop_token_ids holds \[10\]"),
])
def test_bad_arguments_raise_at_construction(policy_kwargs, match, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the LM was loaded before the arguments were checked")

    monkeypatch.setattr("agents.policy.TransformerPolicy.__init__", no_model)
    with pytest.raises(ValueError, match=match):
        make_nlpo(n_envs=1, policy_kwargs=policy_kwargs)


def test_wiring_mistakes_fail_before_or_at_the_first_step():
    model = make_nlpo(n_envs=2, n_steps=8)
    with pytest.raises(ValueError, match=r"use_masking=False"):
        model.learn(16, callback=NLPOCallback())
    with pytest.raises(RuntimeError, match=r"no policy to read masks from: .*NLPOCallback\(\)"):
        make_nlpo(n_envs=2, n_steps=8).learn(16, use_masking=False)
    contrib_buffer = make_nlpo(n_envs=2, n_steps=8, rollout_buffer_class=MaskableDictRolloutBuffer)
    with pytest.raises(TypeError, match=r"rollout buffer is a MaskableDictRolloutBuffer"):
        contrib_buffer.learn(16, callback=NLPOCallback(), use_masking=False)
    with pytest.raises(RuntimeError, match=r"masks its rollout sampled with"):
        contrib_buffer.learn(16, use_masking=False)


def test_save_and_load_keep_the_nlpo_settings_and_mask_with_the_loaded_weights(tmp_path):
    model = make_nlpo(n_envs=2, n_steps=8, policy_kwargs=dict(top_p=0.7, target_update_iterations=3))
    model.learn(32, callback=NLPOCallback(), use_masking=False)
    model.save(tmp_path / "nlpo.zip")
    loaded = MaskablePPO.load(tmp_path / "nlpo.zip", env=model.env)
    policy = loaded.policy
    assert (policy.top_p, policy.target_update_iterations) == (0.7, 3)
    assert all(torch.equal(m, p) for m, p in zip(policy.masking_lm.parameters(), model.policy.lm.parameters()))
    assert not any(key.startswith("masking") for key in policy.state_dict())


def test_held_out_reference_of_an_nlpo_policy_is_the_plain_pretrained_policy():
    from agents.training.evaluation import _reference_copy

    policy = make_nlpo(n_envs=2).policy
    reference = _reference_copy(policy)
    assert policy.masking_lm is not None and reference.masking_lm is None and reference.top_p == 1.0
    assert torch.equal(reference.lm.get_output_embeddings().weight, policy.lm.get_output_embeddings().weight)


def test_held_out_waves_sample_from_the_uncached_masked_policy(monkeypatch):
    """KV-cached evaluation in waves keeps the masking LM's cache on the same rows as the policy's:
    every sampled token lies in the uncached nucleus, and its log-prob is the uncached masked one."""
    from agents.training.evaluation import sample_episodes

    model = make_nlpo(n_envs=3, policy_kwargs=dict(top_p=0.5))
    model.learn(64, callback=NLPOCallback(), use_masking=False)
    policy = model.policy
    with torch.no_grad():  # the policy moves away from its masking copy: the nucleus is the copy's own
        policy.lm.get_output_embeddings().weight.mul_(1.5)
    # Staggered ends built: each episode stops as its (1 + sum of prompt ids % 4)-th token (the
    # prompts are all 3 words long), sampled from the nucleus otherwise.
    stop_at = lambda prompt: 1 + sum(prompt) % 4  # noqa: E731
    script_stops(monkeypatch, policy, stop_at=stop_at)
    encoded = Counter()
    real_encode = RolloutKVCache._encode
    monkeypatch.setattr(RolloutKVCache, "_encode", lambda self, *a: encoded.update([self.lm]) or real_encode(self, *a))
    torch.manual_seed(0)
    episodes = sample_episodes(policy, make_vec_env(KEYWORD.gym_id, n_envs=3, seed=1), 9)
    tokenizer = model.env.envs[0].unwrapped.tokenizer
    assert all(len(e["actions"]) == stop_at(tokenizer(e["prompt"])["input_ids"]) for e in episodes)
    assert len({len(e["actions"]) for e in episodes}) > 1  # staggered ends: rows left the batch
    # One batched encoding per wave of 3 episodes in each LM: the kept rows continued in both caches.
    assert encoded == {policy.lm: 3, policy.masking_lm: 3}
    obs = {k: torch.as_tensor(np.stack([o[k] for e in episodes for o in e["obs"]])) for k in ("input_ids", "attention_mask")}
    actions = torch.as_tensor([a for e in episodes for a in e["actions"]])
    with torch.no_grad():
        masks = policy.allowed_tokens(obs)
        expected = policy.get_distribution(obs).log_prob(actions)
    assert masks.gather(1, actions[:, None]).all() and not masks.all()
    torch.testing.assert_close(torch.as_tensor(np.concatenate([e["log_probs"] for e in episodes])), expected,
                               rtol=0, atol=1e-5)


def test_held_out_kl_of_an_nlpo_policy_scores_the_nucleus_it_samples_from(monkeypatch):
    """The trained row's log-probs are those of the masked distribution the tokens were drawn from
    (equal to the ones recorded while sampling, through the KV caches), not the bare LM's."""
    import agents.training.evaluation as evaluation
    from agents import evaluate_against_reference
    from agents.algorithms.kl import reference_log_probs

    model = make_nlpo(n_envs=2, policy_kwargs=dict(top_p=0.5))
    model.learn(64, callback=NLPOCallback(), use_masking=False)
    policy = model.policy
    with torch.no_grad():  # the policy moves away from its masking copy (and from the reference)
        policy.lm.get_output_embeddings().weight.mul_(1.5)
    sampled = []
    real_sample = evaluation.sample_episodes
    monkeypatch.setattr(evaluation, "sample_episodes", lambda *a, **k: sampled.append(real_sample(*a, **k)) or sampled[-1])
    torch.manual_seed(0)
    results = evaluate_against_reference(model, make_vec_env(KEYWORD.gym_id, n_envs=2, seed=1), n_episodes=6,
                                         verbose=False, kv_cache=True)
    trained = results["trained"].episodes
    torch.testing.assert_close(torch.as_tensor(np.concatenate([s.log_probs for s in trained])),
                               torch.as_tensor(np.concatenate([e["log_probs"] for e in sampled[1]])), rtol=0, atol=1e-5)
    bare = []
    for episode in sampled[1]:
        ids = torch.as_tensor(np.stack([o["input_ids"] for o in episode["obs"]]))
        mask = torch.as_tensor(np.stack([o["attention_mask"] for o in episode["obs"]]))
        with torch.no_grad():
            bare.append(reference_log_probs(policy.lm, ids, mask, torch.as_tensor(episode["actions"])).numpy())
    gaps = np.concatenate([s.log_probs for s in trained]) - np.concatenate(bare)
    # Renormalised over the nucleus: never less likely. The premise (some token renormalised) does not
    # hang on the tokens drawn: a top_p=0.5 nucleus leaves out at least 4 of the 10 tokens at every
    # step, and this near-uniform LM gives them a third to a half of its mass (gaps of 0.32 to 0.74
    # nats at each of the 16 steps, measured).
    assert gaps.min() > -1e-5 and gaps.max() > 0.01
