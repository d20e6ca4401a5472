"""Reward-model training: Bradley-Terry loss, pair construction, metrics, a tiny training run,
save/load, and (slow) the shipped fine-tuned reward model on the real assets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import BertConfig, BertModel, BertTokenizer

from tests.conftest import seeded_runs
from textgym.rewards.finetuned import HEAD_FILE, FineTunedRewardModel
from textgym.rewards.train_reward_model import (
    RewardTrainingConfig,
    _parser,
    bradley_terry_loss,
    is_validation,
    pairwise_accuracy,
    preference_pairs,
    reward_loss,
    sign_accuracy,
    train,
)

POSITIVE = {"good": 1.0, "great": 2.0, "superb": 3.0}
NEGATIVE = {"bad": -1.0, "awful": -2.0, "dreadful": -3.0}
FILLER = ["the", "film", "movie", "plot", "was", "is", "and", "a"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def log_sigmoid_by_hand(x: float) -> float:
    return math.log(1.0 / (1.0 + math.exp(-x)))


def test_bradley_terry_loss_is_minus_log_sigmoid_of_the_margin():
    chosen, rejected = torch.tensor([2.0, 0.5, 3.0]), torch.tensor([1.0, 1.5, -0.25])
    expected = -(log_sigmoid_by_hand(1.0) + log_sigmoid_by_hand(-1.0) + log_sigmoid_by_hand(3.25)) / 3
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    # stable for large margins: exp(-200) underflows, the loss must not become inf or nan
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() == pytest.approx(0.0, abs=1e-30)
    assert bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200.0)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="no pairs"):
        bradley_terry_loss(torch.zeros(0), torch.zeros(0))


def test_preference_pairs_skip_ties_and_point_from_higher_to_lower_rating():
    ratings = torch.tensor([1.0, -2.0, 1.0, 3.0])
    chosen, rejected = preference_pairs(ratings)
    assert chosen.dtype == rejected.dtype == torch.int64
    pairs = set(zip(chosen.tolist(), rejected.tolist()))
    assert pairs == {(0, 1), (2, 1), (3, 0), (3, 1), (3, 2)}  # (0, 2) tie left out, each pair once
    assert bool((ratings[chosen] > ratings[rejected]).all())
    chosen, rejected = preference_pairs(ratings, min_margin=2.5)
    assert set(zip(chosen.tolist(), rejected.tolist())) == {(0, 1), (2, 1), (3, 1)}
    with pytest.raises(ValueError, match="1-D"):
        preference_pairs(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        preference_pairs(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="min_margin"):
        preference_pairs(ratings, min_margin=-1.0)


def test_reward_loss_adds_a_sign_term_that_ignores_zero_ratings():
    scores, ratings = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, -0.5])
    config = RewardTrainingConfig(sign_weight=0.5)
    losses = reward_loss(scores, ratings, config)
    bt = -(log_sigmoid_by_hand(0.5 - 2.0) + log_sigmoid_by_hand(0.5 + 1.0) + log_sigmoid_by_hand(-1.0 - 2.0)) / 3
    sign = -(log_sigmoid_by_hand(0.5) + log_sigmoid_by_hand(-2.0)) / 2  # rating 0 has no sign
    assert losses["bt"].item() == pytest.approx(bt, rel=1e-6)
    assert losses["sign"].item() == pytest.approx(sign, rel=1e-6)
    assert losses["loss"].item() == pytest.approx(bt + 0.5 * sign, rel=1e-6)
    with_regression = reward_loss(scores, ratings, RewardTrainingConfig(sign_weight=0.5, regression_weight=2.0))
    mse = ((0.5 - 1.0) ** 2 + 1.0 + 2.5 ** 2) / 3
    assert with_regression["loss"].item() == pytest.approx(bt + 0.5 * sign + 2.0 * mse, rel=1e-6)


def test_accuracies_count_by_hand():
    ratings = np.array([2.0, -1.0, 0.0, 2.0])
    scores = np.array([1.0, -0.5, 0.3, 0.3])
    # pairs with different ratings: (0,1) right, (0,2) right, (1,2) right, (1,3) right, (2,3) score tie -> 1/2
    assert pairwise_accuracy(scores, ratings) == pytest.approx(4.5 / 5)
    # signed items 0, 1, 3: all agree; item 2 (rating 0) is not counted
    assert sign_accuracy(scores, ratings) == 1.0
    assert sign_accuracy(-scores, ratings) == 0.0
    with pytest.raises(ValueError, match="no pair"):
        pairwise_accuracy(np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="every rating is 0"):
        sign_accuracy(np.ones(2), np.zeros(2))


@pytest.fixture
def tiny_encoder_dir(tmp_path):
    """A tiny random BERT (2 layers, 32 wide) and a word-level tokenizer, saved like a hub model."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "encoder")
    BertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(tmp_path / "encoder")
    return tmp_path / "encoder"


def tiny_reward_model(encoder_dir, seed: int = 0) -> FineTunedRewardModel:
    from transformers import AutoModel, AutoTokenizer

    torch.manual_seed(seed)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["query", "key", "value", "dense"])
    return FineTunedRewardModel.from_encoder(AutoModel.from_pretrained(encoder_dir, add_pooling_layer=False),
                                             AutoTokenizer.from_pretrained(encoder_dir), lora, max_length=16)


def rated_sentences(n: int = 64, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Sentences of filler words and 1-2 sentiment words; rating = sum of the sentiment words' values."""
    rng = np.random.default_rng(seed)
    polar = {**POSITIVE, **NEGATIVE}
    texts, ratings = [], []
    for _ in range(n):
        words = list(rng.choice(list(polar), size=rng.integers(1, 3))) + list(rng.choice(FILLER, size=3))
        rng.shuffle(words)
        texts.append(" ".join(words))
        ratings.append(sum(polar.get(w, 0.0) for w in words))
    return texts, np.array(ratings)


def full_loss(model, texts, ratings, config) -> float:
    with torch.no_grad():
        return reward_loss(torch.as_tensor(model.score_texts(texts)), torch.as_tensor(ratings, dtype=torch.float32),
                           config)["loss"].item()


def train_tiny_reward_model(encoder_dir, seed: int) -> dict:
    """One seeded run of the reward-model test: 40 steps on 64 rated sentences; the figures it asserts."""
    texts, ratings = rated_sentences(seed=seed)
    model = tiny_reward_model(encoder_dir, seed=seed)
    config = RewardTrainingConfig(batch_size=16, max_steps=40, learning_rate=1e-2, warmup_fraction=0.0,
                                  max_length=16, log_every=1000, seed=seed)
    before_loss = full_loss(model, texts, ratings, config)
    before_acc = pairwise_accuracy(model.score_texts(texts), ratings)
    history = train(model, texts, ratings, config, log=lambda _: None)
    after_scores = model.score_texts(texts)
    return dict(model=model, history=history, before_acc=before_acc,
                loss_drop=before_loss - full_loss(model, texts, ratings, config),
                pairwise=pairwise_accuracy(after_scores, ratings), sign=sign_accuracy(after_scores, ratings))


def reward_model_learned(run: dict) -> bool:
    return run["loss_drop"] > 0.3 and run["pairwise"] > 0.75 and run["sign"] > 0.75


@pytest.mark.learning
def test_training_a_tiny_bert_lowers_the_loss_and_orders_the_pairs(tiny_encoder_dir, record_property):
    """Before training every score is equal (the head starts at zero): pairwise accuracy 0.5. After 40
    steps, a run must lower the loss by 0.3 and reach pairwise and sign accuracy above 0.75. Over
    TEXTGYM_TEST_SEED 0-15 one run gave pairwise accuracy 0.80-0.89 and sign accuracy 0.83-0.98;
    over seeds 700-999 (300 runs) 14 fell short, all on the pairwise accuracy (0.62-0.75: the
    scores saturate near +-0.76 and order only the signs), while the sign accuracy stayed >= 0.79 and
    the loss fell by >= 0.30. So up to three seeded runs are made and one must pass: at 14/300 per
    run the test fails with odds (14/300)^3 = 1.0e-4 per CI run. 80 steps at this learning rate
    diverged on one seed (0.25), so the budget stays at 40."""
    runs = seeded_runs(lambda seed: train_tiny_reward_model(tiny_encoder_dir, seed), reward_model_learned)
    record_property("figure", runs[0]["pairwise"])
    record_property("runs", len(runs))
    run = runs[-1]
    assert len(run["history"]) == 40 and [h["step"] for h in run["history"][:2]] == [1, 2]
    assert run["before_acc"] == 0.5
    assert reward_model_learned(run), [{k: r[k] for k in ("loss_drop", "pairwise", "sign")} for r in runs]
    model = run["model"]
    # only the adapter and the head were trained: the frozen base weights are unchanged
    base = BertModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False)
    tuned = model.encoder.get_base_model()
    torch.testing.assert_close(tuned.encoder.layer[0].attention.self.query.base_layer.weight,
                               base.encoder.layer[0].attention.self.query.weight, rtol=0, atol=0)


def test_training_is_seeded(tiny_encoder_dir):
    texts, ratings = rated_sentences(32)
    config = RewardTrainingConfig(batch_size=8, max_steps=5, learning_rate=1e-2, max_length=16, log_every=1000)
    runs = []
    for _ in range(2):
        model = tiny_reward_model(tiny_encoder_dir)
        train(model, texts, ratings, config, log=lambda _: None)
        runs.append(model.score_texts(texts))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_epoch_callback_runs_after_each_full_pass_and_training_mode_is_restored(tiny_encoder_dir):
    texts, ratings = rated_sentences(20)
    model = tiny_reward_model(tiny_encoder_dir)
    epochs, training_forwards = [], []
    model.head.register_forward_pre_hook(
        lambda module, _: training_forwards.append(module.training) if torch.is_grad_enabled() else None)

    def careless_callback(epoch):  # scores a split and leaves the model in eval mode
        epochs.append((epoch, len(training_forwards)))
        model.score_texts(texts[:4])
        model.eval()

    config = RewardTrainingConfig(batch_size=8, max_steps=8, max_length=16, log_every=1000)  # 3 steps per epoch
    train(model, texts, ratings, config, log=lambda _: None, on_epoch_end=careless_callback)
    assert epochs == [(1, 3), (2, 6)]  # after steps 3 and 6; step 8 ends no epoch
    assert training_forwards == [True] * 8  # every training step ran with dropout on


def test_validation_split_is_carved_from_training_and_flags_mirror_the_config():
    from textgym import assets

    ids = range(1000)
    validation = {i for i in ids if is_validation(i)}
    test = {i for i in ids if assets.is_held_out(i)}
    assert not validation & test and len(validation) == len(test) == 200
    args = vars(_parser().parse_args(["--validation", "--lora-r", "16", "--learning-rate", "1e-3",
                                      "--lora-targets", "query", "value"]))
    assert args["validation"] and args["out"] is None
    assert args["lora_r"] == 16 and args["learning_rate"] == 1e-3 and args["lora_targets"] == ["query", "value"]
    defaults = RewardTrainingConfig()
    assert args["epochs"] == defaults.epochs and args["max_steps"] is None and args["sign_weight"] == defaults.sign_weight
    config_fields = {f.name for f in __import__("dataclasses").fields(RewardTrainingConfig)}
    assert set(args) - {"out", "validation"} == config_fields - {"init_head", "extra"}


def test_save_load_round_trip_gives_identical_scores(tiny_encoder_dir, tmp_path):
    texts, ratings = rated_sentences(32)
    model = tiny_reward_model(tiny_encoder_dir)
    model.info = {"note": "tiny"}
    train(model, texts, ratings, RewardTrainingConfig(batch_size=8, max_steps=5, learning_rate=1e-2,
                                                      max_length=16, log_every=1000), log=lambda _: None)
    expected = model.score_texts(texts)
    saved = model.save(tmp_path / "rm")
    assert {p.name for p in saved.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", HEAD_FILE}
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"].startswith("all-MiniLM")
    unmerged = FineTunedRewardModel.load(saved, encoder_path=tiny_encoder_dir, merge=False)
    np.testing.assert_array_equal(unmerged.score_texts(texts), expected)
    assert unmerged.info == {"note": "tiny"} and unmerged.max_length == 16
    merged = FineTunedRewardModel.load(saved, encoder_path=tiny_encoder_dir)
    np.testing.assert_allclose(merged.score_texts(texts), expected, rtol=0, atol=1e-5)
    placed = FineTunedRewardModel.load(saved, encoder_path=tiny_encoder_dir, device="cpu")
    assert placed.device == torch.device("cpu") and placed.to("cpu") is placed
    np.testing.assert_array_equal(placed.score_texts(texts), merged.score_texts(texts))
    # the reward-model contract: one float32 score per (prompt, completion), of prompt + completion
    got = merged(["good film", "the plot"], [" and superb", " was dreadful"])
    assert got.dtype == np.float32 and got.shape == (2,)
    np.testing.assert_array_equal(got, merged.score_texts(["good film and superb", "the plot was dreadful"]))
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        merged(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="merged"):
        merged.save(tmp_path / "again")
    (saved / HEAD_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=HEAD_FILE):
        FineTunedRewardModel.load(saved, encoder_path=tiny_encoder_dir)


def test_bad_construction_is_refused(tiny_encoder_dir):
    from transformers import AutoModel, AutoTokenizer

    lora = LoraConfig(r=2, target_modules=["query"])
    encoder = AutoModel.from_pretrained(tiny_encoder_dir, add_pooling_layer=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_encoder_dir)
    with pytest.raises(ValueError, match="32 entries"):
        FineTunedRewardModel.from_encoder(encoder, tokenizer, lora, head_weight=[0.0] * 31)
    with pytest.raises(ValueError, match=r"Linear\(32, 1\)"):
        FineTunedRewardModel(encoder, tokenizer, torch.nn.Linear(32, 2))
    model = FineTunedRewardModel(encoder, tokenizer, torch.nn.Linear(32, 1))
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.forward([])
    with pytest.raises(ValueError, match="need >= 2 texts"):
        train(model, ["good"], np.array([1.0]), RewardTrainingConfig())


@pytest.mark.slow
def test_shipped_reward_model_scores_the_real_held_out_sentences():
    from textgym import assets

    model = FineTunedRewardModel.pretrained()
    info = model.info
    assert info["split"] == "held out: sentence id % 5 == 0" and info["test_sign_accuracy"] > 0.785
    held_out = [s for s in assets.movie_review_sentences() if assets.is_held_out(s.id)]
    scores = model.score_texts([s.text for s in held_out])
    ratings = np.array([s.rating for s in held_out])
    # the merged model reproduces the figures recorded at training time (up to float rounding)
    assert sign_accuracy(scores, ratings) == pytest.approx(info["test_sign_accuracy"], abs=0.002)
    assert pairwise_accuracy(scores, ratings) == pytest.approx(info["test_pairwise_accuracy"], abs=0.002)
    good, bad = model(["This film is"] * 2, [" a wonderful, moving triumph.", " a dull, lifeless mess."])
    assert good > 0 > bad


def test_sequence_classifier_reward_is_the_chosen_logit_on_its_device(tiny_encoder_dir, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from textgym.rewards.classifier import SequenceClassifierReward

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    classifier = BertForSequenceClassification(config).eval()
    classifier.save_pretrained(tmp_path / "clf")
    tokenizer = BertTokenizer.from_pretrained(tiny_encoder_dir)
    tokenizer.save_pretrained(tmp_path / "clf")
    reward = SequenceClassifierReward(str(tmp_path / "clf"), device="cpu")
    texts = ["good film and superb", "the plot was dreadful"]
    with torch.no_grad():
        expected = classifier(**tokenizer(texts, padding=True, return_tensors="pt")).logits[:, -1].numpy()
    got = reward(["good film", "the plot"], [" and superb", " was dreadful"])
    assert got.dtype == np.float32 and reward.device == torch.device("cpu")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
