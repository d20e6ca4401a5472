"""Train the fine-tuned reward model: ``python -m textgym.rewards.train_reward_model``.

Fits :class:`textgym.rewards.finetuned.FineTunedRewardModel` (all-MiniLM-L6-v2 + LoRA adapter + linear
head) to the human ratings of the 10,605 movie-review sentences of Hutto & Gilbert (2014), on the
fixed split of :func:`textgym.assets.is_held_out` (id % 5 == 0 held out, as for the sentiment head).

Loss, per mini-batch of sentences with mean human ratings ``r`` and scores ``s``:

- **Bradley-Terry** (Bradley & Terry 1952; the reward-model loss of Ouyang et al. 2022): over
  every in-batch pair ``(i, j)`` with ``r_i > r_j``, ``-log sigmoid(s_i - s_j)``, averaged
  (:func:`bradley_terry_loss`, :func:`preference_pairs`). This fixes scores only up to a constant.
- **sign term** (weight :attr:`RewardTrainingConfig.sign_weight`): logistic loss of ``s`` on
  "``r > 0``" (sentences rated exactly 0 left out). It pins the zero point, so ``s > 0`` predicts
  a positive rating and ``s`` stays a log-odds like the frozen head's logit it starts from.
- optional **regression** term (weight :attr:`RewardTrainingConfig.regression_weight`, default 0):
  squared error of ``s`` against ``r``.

The head starts from the packaged logistic head (``sentiment_head.json``) and LoRA starts at zero,
so step 0 is exactly the current default reward model. Everything is seeded; with the same number
of torch threads a run repeats exactly. Writes ``runs/reward_model/`` (adapter safetensors + json,
head, provenance; ``--out textgym/data/reward_model`` in a source checkout replaces the shipped
model) and prints held-out sign and pairwise accuracy next to VADER's and the
frozen head's. VADER's figures need the ``train`` extra (``pip install -e '.[train]'``).

``--validation`` is for model selection: it trains without the validation sentences of
:func:`is_validation` (id % 5 == 1), scores them after every epoch and never scores the test
split; the shipped defaults (rank 16, learning rate 1e-3, 4 epochs) were chosen that way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from textgym import assets
from textgym.rewards.finetuned import ENCODER_NAME, REWARD_MODEL_DIR, FineTunedRewardModel


@dataclass
class RewardTrainingConfig:
    """Hyperparameters of :func:`train` and :func:`main`, all in one place."""

    seed: int = 0
    """Seeds shuffling, dropout and LoRA initialisation."""
    epochs: float = 4.0
    """Passes over the training sentences (fractions allowed); 4 epochs = 1,064 steps."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (overrides ``epochs``; for timing runs)."""
    batch_size: int = 32
    """Sentences per step; all in-batch pairs with different ratings enter the BT loss (~490 pairs)."""
    learning_rate: float = 1e-3
    """AdamW peak learning rate of the LoRA matrices and the head."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    warmup_fraction: float = 0.06
    """Linear warm-up over this fraction of the steps, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global L2 norm)."""
    max_length: int = 64
    """Truncation during training, in tokens (sentences: median 26, 99th percentile 54, max 73)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (update scaled by ``alpha / r``)."""
    lora_dropout: float = 0.1
    """Dropout on the LoRA input."""
    lora_targets: tuple[str, ...] = ("query", "key", "value", "dense")
    """Linear layers that get an adapter: attention q/k/v and output, FFN in and out (all 6 layers)."""
    min_margin: float = 0.0
    """Pairs enter the BT loss only if their ratings differ by more than this."""
    sign_weight: float = 1.0
    """Weight of the logistic sign term that calibrates the zero point."""
    regression_weight: float = 0.0
    """Weight of the optional squared-error term against the raw rating."""
    threads: int = 2
    """torch intra-op threads during the run (bit-exact repeats need the same count)."""
    log_every: int = 50
    """Print running losses every this many steps."""
    init_head: bool = True
    """Start the head from the packaged ``sentiment_head.json`` (else zeros)."""
    extra: dict = field(default_factory=dict)
    """Free-form notes copied into the provenance."""


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry negative log-likelihood ``-log sigmoid(chosen - rejected)``.

    Bradley & Terry (1952); the pairwise reward-model loss of Ouyang et al. (2022, eq. 1).
    Computed as ``softplus(rejected - chosen)``, which is exact and stable for large margins.

    :param chosen: scores of the preferred items, float tensor ``(n_pairs,)``.
    :param rejected: scores of the other items, same shape.
    :return: scalar float tensor (differentiable).
    :raises ValueError: shapes differ or there are no pairs.
    """
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"chosen and rejected must be 1-D of the same shape, got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    if chosen.numel() == 0:
        raise ValueError("no pairs: the Bradley-Terry loss needs at least one (chosen, rejected) pair")
    return torch.nn.functional.softplus(rejected - chosen).mean()


def preference_pairs(ratings: torch.Tensor, min_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs of items whose ratings differ by more than ``min_margin``.

    :param ratings: float tensor ``(n,)`` of human ratings (higher = preferred).
    :param min_margin: pairs with ``|r_i - r_j| <= min_margin`` are skipped (ties always are).
    :return: ``(chosen, rejected)``, two int64 tensors ``(n_pairs,)`` of indices into ``ratings``
        with ``ratings[chosen] > ratings[rejected] + min_margin``; each unordered pair appears once.
    :raises ValueError: ``ratings`` is not 1-D, holds NaN, or ``min_margin < 0``.
    """
    ratings = torch.as_tensor(ratings)
    if ratings.ndim != 1:
        raise ValueError(f"ratings must be 1-D, got shape {tuple(ratings.shape)}")
    if torch.isnan(ratings).any():
        raise ValueError("ratings contain NaN")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    chosen, rejected = torch.nonzero(ratings[:, None] - ratings[None, :] > min_margin, as_tuple=True)
    return chosen, rejected


def reward_loss(scores: torch.Tensor, ratings: torch.Tensor, config: RewardTrainingConfig) -> dict[str, torch.Tensor]:
    """The training objective of one batch (see the module docstring).

    :param scores: float tensor ``(n,)``, the model's scores.
    :param ratings: float tensor ``(n,)``, the human ratings.
    :param config: weights ``sign_weight``, ``regression_weight`` and ``min_margin``.
    :return: ``{"loss", "bt", "sign", "regression"}`` scalar tensors; ``bt`` is 0 when the batch
        has no pair with different ratings.
    """
    zero = scores.new_zeros(())
    chosen, rejected = preference_pairs(ratings, config.min_margin)
    bt = bradley_terry_loss(scores[chosen], scores[rejected]) if chosen.numel() else zero
    signed = ratings != 0
    sign = (torch.nn.functional.binary_cross_entropy_with_logits(scores[signed], (ratings[signed] > 0).float())
            if signed.any() else zero)
    regression = torch.nn.functional.mse_loss(scores, ratings) if config.regression_weight else zero
    loss = bt + config.sign_weight * sign + config.regression_weight * regression
    return {"loss": loss, "bt": bt, "sign": sign, "regression": regression}


def pairwise_accuracy(scores: np.ndarray, ratings: np.ndarray) -> float:
    """Fraction of pairs with different ratings that the scores order the same way (ties count 1/2).

    This is the concordance of Kendall's tau over all ``n(n-1)/2`` pairs with ``r_i != r_j``.

    :param scores: float array ``(n,)``.
    :param ratings: float array ``(n,)``.
    :return: accuracy in [0, 1].
    :raises ValueError: shapes differ or no pair has different ratings.
    """
    scores, ratings = np.asarray(scores, dtype=np.float64), np.asarray(ratings, dtype=np.float64)
    if scores.shape != ratings.shape or scores.ndim != 1:
        raise ValueError(f"scores and ratings must be 1-D of the same shape, got {scores.shape} and {ratings.shape}")
    right = total = 0.0
    for start in range(0, len(scores), 512):  # chunks of rows keep memory at 512 x n
        dr = np.sign(ratings[start:start + 512, None] - ratings[None, :])
        ds = np.sign(scores[start:start + 512, None] - scores[None, :])
        counted = dr != 0
        total += counted.sum()
        right += (ds[counted] == dr[counted]).sum() + 0.5 * (ds[counted] == 0).sum()
    if total == 0:
        raise ValueError("no pair of items has different ratings")
    return float(right / total)


def sign_accuracy(scores: np.ndarray, ratings: np.ndarray) -> float:
    """Fraction of items rated != 0 where ``score > 0`` agrees with ``rating > 0``.

    :raises ValueError: shapes differ or every rating is 0.
    """
    scores, ratings = np.asarray(scores), np.asarray(ratings)
    if scores.shape != ratings.shape:
        raise ValueError(f"scores {scores.shape} and ratings {ratings.shape} differ in shape")
    signed = ratings != 0
    if not signed.any():
        raise ValueError("every rating is 0: sign accuracy is undefined")
    return float(((scores[signed] > 0) == (ratings[signed] > 0)).mean())


def train(model: FineTunedRewardModel, texts: list[str], ratings: np.ndarray, config: RewardTrainingConfig,
          log: Callable[[str], None] = print,
          on_epoch_end: Callable[[int], None] | None = None) -> list[dict[str, float]]:
    """Fit ``model`` in place with AdamW on the loss of :func:`reward_loss`.

    Shuffles ``texts`` each epoch with a generator seeded by ``config.seed`` and steps over
    batches of ``config.batch_size`` (the last, shorter batch of an epoch is kept).

    :param model: model to train (its :meth:`~FineTunedRewardModel.trainable_parameters`).
    :param texts: training sentences.
    :param ratings: float array ``(len(texts),)`` of their human ratings.
    :param config: hyperparameters; ``config.threads`` is *not* applied here (see :func:`main`).
    :param log: where progress lines go.
    :param on_epoch_end: called with the epoch number (1, 2, ...) after each full pass, e.g. to
        score a validation split; it may switch the model to eval mode (training mode is restored).
    :return: one dict per step: ``step``, ``loss``, ``bt``, ``sign``, ``regression``, ``seconds``.
    :raises ValueError: ``texts`` and ``ratings`` differ in length, fewer than 2 texts, or a
        non-positive batch size / step count.
    """
    from transformers import get_linear_schedule_with_warmup

    ratings_t = torch.as_tensor(np.asarray(ratings, dtype=np.float32))
    if len(texts) != len(ratings_t) or len(texts) < 2:
        raise ValueError(f"need >= 2 texts and one rating per text, got {len(texts)} texts, {len(ratings_t)} ratings")
    if config.batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (pairs are formed in-batch), got {config.batch_size}")
    steps_per_epoch = -(-len(texts) // config.batch_size)
    total = config.max_steps if config.max_steps is not None else round(config.epochs * steps_per_epoch)
    if total < 1:
        raise ValueError(f"training would take {total} steps; raise epochs or max_steps")

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, round(config.warmup_fraction * total), total)
    model.train()
    history, order, start = [], torch.zeros(0, dtype=torch.long), time.perf_counter()
    for step in range(total):
        position = (step % steps_per_epoch) * config.batch_size
        if position == 0:
            order = torch.randperm(len(texts), generator=generator)
        idx = order[position:position + config.batch_size]
        scores = model.forward([texts[i] for i in idx.tolist()], max_length=config.max_length)
        losses = reward_loss(scores, ratings_t[idx], config)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), config.max_grad_norm)
        optimizer.step()
        schedule.step()
        history.append({"step": step + 1, **{k: v.item() for k, v in losses.items()},
                        "seconds": time.perf_counter() - start})
        if (step + 1) % config.log_every == 0 or step + 1 == total:
            recent = history[-config.log_every:]
            means = {k: np.mean([h[k] for h in recent]) for k in ("loss", "bt", "sign")}
            log(f"step {step + 1}/{total} (epoch {(step + 1) / steps_per_epoch:.2f}): loss {means['loss']:.4f} "
                f"bt {means['bt']:.4f} sign {means['sign']:.4f}  {history[-1]['seconds']:.0f}s")
        if on_epoch_end is not None and (step + 1) % steps_per_epoch == 0:
            on_epoch_end((step + 1) // steps_per_epoch)
            model.train()
    model.eval()
    return history


def vader_scores(texts: list[str]) -> np.ndarray | None:
    """VADER ``compound`` scores (Hutto & Gilbert 2014), or ``None`` without ``vaderSentiment``."""
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        return None
    analyzer = SentimentIntensityAnalyzer()
    return np.array([analyzer.polarity_scores(t)["compound"] for t in texts])


def is_validation(sentence_id: int) -> bool:
    """The model-selection split carved from the training sentences: id % 5 == 1.

    20% of all sentences (a quarter of the training split), disjoint from the held-out test split
    of :func:`textgym.assets.is_held_out`. ``--validation`` runs train without them and score them
    after every epoch, so hyperparameters and the number of epochs are chosen without ever looking
    at the test split.
    """
    return sentence_id % 5 == 1


DEFAULT_OUT = Path("runs") / REWARD_MODEL_DIR
"""Default output directory, relative to the working directory (the shipped model is only replaced on request)."""


def _parser() -> argparse.ArgumentParser:
    """Command line: ``--out``, ``--validation`` and one ``--flag`` per :class:`RewardTrainingConfig` field."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help=f"where to save (default: {DEFAULT_OUT}, never inside the installed package; "
                             "--out textgym/data/reward_model in a source checkout replaces the shipped model; "
                             "with --validation nothing is saved unless --out is given)")
    parser.add_argument("--validation", action="store_true",
                        help="model selection: leave the validation split (id %% 5 == 1) out of training, score it "
                             "after every epoch, and do not score the test split")
    kinds = {"int": int, "float": float, "int | None": int}
    for f in dataclasses.fields(RewardTrainingConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in kinds:
            parser.add_argument(flag, type=kinds[f.type], default=f.default)
        elif f.name == "lora_targets":
            parser.add_argument(flag, nargs="+", default=list(f.default))
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate (validation split per epoch, or the test split), and save with provenance.

    :return: the provenance dict (``info``) of the trained model.
    """
    from peft import LoraConfig
    from transformers import AutoModel, AutoTokenizer

    from textgym.rewards.sentiment import load_sentiment_head

    args = vars(_parser().parse_args(argv))
    out, validation = args.pop("out"), args.pop("validation")
    args["lora_targets"] = tuple(args["lora_targets"])
    config = RewardTrainingConfig(**args)
    if out is None and not validation:
        out = DEFAULT_OUT
    torch.set_num_threads(config.threads)

    sentences = assets.movie_review_sentences()
    if validation:
        test_set = [s for s in sentences if is_validation(s.id)]
        train_set = [s for s in sentences if not assets.is_held_out(s.id) and not is_validation(s.id)]
    else:
        test_set = [s for s in sentences if assets.is_held_out(s.id)]
        train_set = [s for s in sentences if not assets.is_held_out(s.id)]
    test_texts = [s.text for s in test_set]
    test_ratings = np.array([s.rating for s in test_set])
    split = "validation" if validation else "test"

    path = assets.minilm_path()
    torch.manual_seed(config.seed)
    head = load_sentiment_head()
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_targets))
    model = FineTunedRewardModel.from_encoder(
        AutoModel.from_pretrained(path, add_pooling_layer=False), AutoTokenizer.from_pretrained(path), lora,
        head["weight"] if config.init_head else None, head["bias"] if config.init_head else 0.0)

    baseline = model.score_texts(test_texts)  # step 0 = frozen MiniLM + packaged logistic head
    per_epoch = []

    def score_split(epoch: int) -> None:
        scores = model.score_texts(test_texts)
        per_epoch.append({"epoch": epoch, f"{split}_sign_accuracy": sign_accuracy(scores, test_ratings),
                          f"{split}_pairwise_accuracy": pairwise_accuracy(scores, test_ratings)})
        print(f"epoch {epoch}: {split} sign accuracy {per_epoch[-1][f'{split}_sign_accuracy']:.4f}, "
              f"pairwise {per_epoch[-1][f'{split}_pairwise_accuracy']:.4f}", flush=True)

    start = time.perf_counter()
    history = train(model, [s.text for s in train_set], np.array([s.rating for s in train_set]), config,
                    on_epoch_end=score_split if validation else None)
    train_seconds = time.perf_counter() - start
    scores = model.score_texts(test_texts)

    vader = vader_scores(test_texts)
    figures = {
        f"{split}_sign_accuracy": sign_accuracy(scores, test_ratings),
        f"{split}_pairwise_accuracy": pairwise_accuracy(scores, test_ratings),
        f"frozen_head_{split}_sign_accuracy": sign_accuracy(baseline, test_ratings),
        f"frozen_head_{split}_pairwise_accuracy": pairwise_accuracy(baseline, test_ratings),
    }
    if vader is not None:
        figures[f"vader_{split}_sign_accuracy"] = sign_accuracy(vader, test_ratings)
        figures[f"vader_{split}_pairwise_accuracy"] = pairwise_accuracy(vader, test_ratings)
    n_adapter = sum(p.numel() for p in model.trainable_parameters())
    model.info = {
        "encoder": ENCODER_NAME,
        "data": f"movieReviewSnippets_GroundTruth ({assets.VADER_SDIST.name}=={assets.VADER_SDIST.version} sdist)",
        "split": ("validation: sentence id % 5 == 1 (trained on id % 5 in {2, 3, 4})" if validation
                  else "held out: sentence id % 5 == 0"),
        "loss": "Bradley-Terry over in-batch pairs with different mean ratings "
                "+ sign_weight * logistic loss on rating > 0 (ratings of 0 left out of that term)",
        "sign_accuracy": f"score > 0 vs human mean rating > 0, {split} sentences rated != 0",
        "pairwise_accuracy": f"{split} pairs with different ratings ordered correctly (score ties = 1/2)",
        "n_train": len(train_set), f"n_{split}": len(test_set),
        f"n_{split}_signed": int((test_ratings != 0).sum()),
        **figures,
        **({"per_epoch": per_epoch} if validation else {}),
        "trainable_parameters": n_adapter,
        "steps": len(history),
        "final_train_loss_last_100_steps": float(np.mean([h["loss"] for h in history[-100:]])),
        "train_seconds": round(train_seconds, 1),
        "torch_threads": config.threads,
        "torch_version": torch.__version__,
        "config": dataclasses.asdict(config),
    }
    print(json.dumps({k: v for k, v in model.info.items() if k != "config"}, indent=1))
    if out is not None:
        model.save(out)
        print(f"wrote {out}")
    return model.info


if __name__ == "__main__":
    main()
