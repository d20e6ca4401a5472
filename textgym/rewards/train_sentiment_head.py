"""Retrain the default sentiment reward head: ``python -m textgym.rewards.train_sentiment_head``.

Embeds the 10,605 human-rated movie-review sentences with frozen all-MiniLM-L6-v2, fits a
logistic regression (scikit-learn, L-BFGS, deterministic) to "human rating > 0" on the training
split, reports accuracy on the fixed held-out split next to VADER's, and writes
``runs/sentiment_head.json`` (``--out textgym/data/sentiment_head.json`` replaces the shipped head). Sentences rated exactly 0 (37) are left out: they have no sign.
Needs the ``train`` extra (``pip install -e '.[train]'``) for scikit-learn and vaderSentiment.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from textgym import assets
from textgym.rewards.embeddings import mean_pooled_embeddings
from textgym.rewards.sentiment import SENTIMENT_HEAD_FILE

REGULARISATION_C = 1.0
"""Inverse L2 strength of the logistic regression (scikit-learn's default)."""


def vader_accuracy(texts: list[str], labels: np.ndarray) -> float:
    """Fraction of sentences where VADER's ``compound > 0`` agrees with ``labels`` (bool array)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    predictions = np.array([analyzer.polarity_scores(t)["compound"] > 0 for t in texts])
    return float((predictions == labels).mean())


def main(argv: list[str] | None = None) -> dict:
    """Fit, evaluate and save the head; returns the saved dict."""
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs") / SENTIMENT_HEAD_FILE,
                        help="where to write the head (default: runs/sentiment_head.json, never inside the installed "
                             "package; --out textgym/data/sentiment_head.json in a source checkout replaces the shipped one)")
    args = parser.parse_args(argv)

    sentences = [s for s in assets.movie_review_sentences() if s.rating != 0]
    texts = [s.text for s in sentences]
    labels = np.array([s.rating > 0 for s in sentences])
    test = np.array([assets.is_held_out(s.id) for s in sentences])

    path = assets.minilm_path()
    encoder = AutoModel.from_pretrained(path).eval()
    embeddings = mean_pooled_embeddings(encoder, AutoTokenizer.from_pretrained(path), texts).numpy()

    head = LogisticRegression(C=REGULARISATION_C, max_iter=2000).fit(embeddings[~test], labels[~test])
    accuracy = float(head.score(embeddings[test], labels[test]))
    result = {
        "weight": head.coef_[0].astype(float).tolist(),
        "bias": float(head.intercept_[0]),
        "encoder": f"all-MiniLM-L6-v2 ({assets.MINILM.name}=={assets.MINILM.version})",
        "data": f"movieReviewSnippets_GroundTruth ({assets.VADER_SDIST.name}=={assets.VADER_SDIST.version} sdist)",
        "label": "human mean rating > 0 (ratings of exactly 0 dropped)",
        "split": "held out: sentence id % 5 == 0",
        "n_train": int((~test).sum()),
        "n_test": int(test.sum()),
        "test_accuracy": accuracy,
        "vader_test_accuracy": vader_accuracy([t for t, h in zip(texts, test) if h], labels[test]),
        "train_accuracy": float(head.score(embeddings[~test], labels[~test])),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"held-out accuracy {accuracy:.3f} (VADER {result['vader_test_accuracy']:.3f}) "
          f"on {result['n_test']} sentences; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
