"""Hyperparameter files for rl-baselines3-zoo (``rl_zoo3==2.9.2``), shipped with the package.

``ppo.yml`` holds one entry per textgym Gymnasium id (``TextGen-v0`` and the synthetic tasks);
its comments say how the zoo reads each value. Pass it to the zoo as a path
(``-conf textgym/hyperparams/ppo.yml`` from a checkout, or the path :func:`yaml_path` returns) or,
from any directory, as this module: ``-conf textgym.hyperparams`` (the zoo imports a ``-conf``
value that is neither ``.yml`` nor ``.py`` and reads its ``hyperparams`` attribute, which here is
``ppo.yml`` loaded afresh on every access). The classes it names live in :mod:`agents.training.zoo`
(named through :mod:`agents.zoo`, whose import installs the text sampler).
Importing this module stays light (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ALGOS = ("ppo",)
"""Algorithms with a shipped file (``<algo>.yml``)."""


def yaml_path(algo: str = "ppo") -> Path:
    """Path of the shipped hyperparameter file of ``algo``.

    Source: textgym (issue 12).

    :param algo: the zoo's algorithm key; one of :data:`ALGOS`.
    :return: ``.../textgym/hyperparams/<algo>.yml``.
    :raises ValueError: no file for ``algo``.
    """
    if algo not in ALGOS:
        raise ValueError(f"no hyperparameter file for {algo!r}; textgym ships {list(ALGOS)}")
    return Path(__file__).with_name(f"{algo}.yml")


def load(algo: str = "ppo") -> dict[str, Any]:
    """The shipped hyperparameters of ``algo`` by Gymnasium id, as the zoo reads them (``yaml.safe_load``).

    A new dict on every call: the zoo edits the entry it uses in place.

    Source: textgym (issue 12).

    :param algo: one of :data:`ALGOS`.
    :return: ``{gym_id: {hyperparameter: value}}``, values as written (strings where the zoo evals).
    :raises ValueError: no file for ``algo``.
    """
    import yaml

    return yaml.safe_load(yaml_path(algo).read_text())


def __getattr__(name: str) -> Any:
    """PEP 562: ``hyperparams`` is ``load("ppo")``, read afresh on each access (``-conf textgym.hyperparams``)."""
    if name == "hyperparams":
        return load("ppo")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
