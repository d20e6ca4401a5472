"""Reward-model size and scoring speed: fine-tuned (LoRA) vs frozen-head MiniLM. Prints markdown tables.

Scores env-like texts (a held-out 6-word movie-review prompt + the rest of its sentence as the
"completion") in batches of 8 and 64 with 1 and 2 torch threads, after one warm-up batch::

    python benchmarks/reward_model.py                  # ~1-2 minutes on 2 cores
    python benchmarks/reward_model.py --sentences 128  # quicker, noisier
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import textgym
from textgym.assets import is_held_out, movie_review_sentences
from textgym.rewards.finetuned import REWARD_MODEL_DIR, FineTunedRewardModel
from textgym.rewards.sentiment import SENTIMENT_HEAD_FILE, SentimentRewardModel
from textgym.tasks.sentiment import movie_review_prompts


def shipped_bytes(*parts: str) -> int:
    """Total size in bytes of files or directories under ``textgym/data``."""
    data = Path(textgym.__file__).parent / "data"
    return sum(sum(f.stat().st_size for f in (data / p).rglob("*") if f.is_file()) if (data / p).is_dir()
               else (data / p).stat().st_size for p in parts)


def sentences_per_second(score, prompts: list[str], completions: list[str], batch: int) -> float:
    """Throughput of ``score(prompts, completions)`` over all texts, in batches of ``batch``."""
    score(prompts[:batch], completions[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        score(prompts[i:i + batch], completions[i:i + batch])
    return len(prompts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=512, help="texts scored per configuration")
    args = parser.parse_args()

    prompts_set = set(movie_review_prompts("test"))
    texts = [s.text for s in movie_review_sentences() if is_held_out(s.id)]
    pairs = []
    for text in texts:
        words = text.split()
        prompt = " ".join(words[:6])
        if prompt in prompts_set and len(words) > 6:
            pairs.append((prompt, " " + " ".join(words[6:])))
    pairs = pairs[:args.sentences]
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]

    tuned = FineTunedRewardModel.pretrained()  # LoRA merged into the encoder
    frozen = SentimentRewardModel()
    n_encoder = sum(p.numel() for p in tuned.encoder.parameters())
    n_adapter = tuned.info.get("trainable_parameters", 0)
    print(f"torch {torch.__version__}; {len(prompts)} held-out texts per configuration\n")
    print("| reward model | encoder parameters | trained parameters | shipped bytes | held-out sign acc. | held-out pairwise acc. |")
    print("|---|---|---|---|---|---|")
    print(f"| frozen MiniLM + logistic head | {n_encoder:,} | 385 | {shipped_bytes(SENTIMENT_HEAD_FILE):,} "
          f"| {tuned.info['frozen_head_test_sign_accuracy']:.1%} | {tuned.info['frozen_head_test_pairwise_accuracy']:.1%} |")
    print(f"| MiniLM + LoRA + head (fine-tuned) | {n_encoder:,} | {n_adapter:,} | {shipped_bytes(REWARD_MODEL_DIR):,} "
          f"| {tuned.info['test_sign_accuracy']:.1%} | {tuned.info['test_pairwise_accuracy']:.1%} |")
    print()
    print("| reward model | threads | batch | sentences/s |")
    print("|---|---|---|---|")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (8, 64):
            for name, model in (("frozen head", frozen), ("fine-tuned", tuned)):
                rate = sentences_per_second(model, prompts, completions, batch)
                print(f"| {name} | {threads} | {batch} | {rate:.0f} |", flush=True)


if __name__ == "__main__":
    main()
