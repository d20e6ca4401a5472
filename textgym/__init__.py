"""textgym: text generation as a Gymnasium environment, trained with upstream Stable-Baselines3.

``import textgym`` registers ``TextGen-v0`` (:class:`textgym.env.TextGenEnv`) and the synthetic
sanity tasks of :mod:`textgym.synthetic` (``TextGen-Keyword-v0``, ...) with Gymnasium.
"""

from gymnasium.envs.registration import register

from textgym.assets import DEFAULT_MODEL, AssetError
from textgym.env import TextGenEnv
from textgym.prompts import movie_review_prompts
from textgym.reward_model import FineTunedRewardModel
from textgym.rewards import SentimentRewardModel, SequenceClassifierReward
from textgym.spaces import TokenWindowSpace

register(id="TextGen-v0", entry_point="textgym.env:TextGenEnv")

from textgym.synthetic import TASKS, register_synthetic_tasks  # noqa: E402

register_synthetic_tasks()  # TextGen-Keyword-v0, -Copy-v0, -Reverse-v0, -Increasing-v0

__all__ = [
    "DEFAULT_MODEL",
    "AssetError",
    "FineTunedRewardModel",
    "TASKS",
    "SentimentRewardModel",
    "SequenceClassifierReward",
    "TextGenEnv",
    "TokenWindowSpace",
    "movie_review_prompts",
]
__version__ = "0.1.0"
