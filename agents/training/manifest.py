"""Checkpoint manifests: which files make one checkpoint, and whether they are whole.

:class:`agents.RollingCheckpointCallback` writes a checkpoint's files (each atomically, see
:mod:`agents.training.atomic`) and then, last, a small JSON manifest
``{name_prefix}_manifest_{steps}_steps.json`` listing every file with its size and SHA-256. A
checkpoint without a manifest was interrupted (a kill, a full disk) and is never loaded; one whose
files differ from their manifest was damaged after the save. :func:`latest_checkpoint` finds the
newest checkpoint that is complete and whole.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from agents.training.atomic import atomic_write_bytes, sha256_file

FORMAT = "textgym.checkpoint"
"""The ``format`` entry of a manifest."""

VERSION = 1
"""The ``version`` entry of the manifests this module writes."""

DAMAGED = "the file is damaged; use the previous checkpoint"
"""The end of every message about a file whose bytes differ from what was saved."""


@dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint: its step count and the paths of its parts.

    ``parts`` maps a part's kind to its path: ``"model"`` (SB3 zip, ``PPO.load``), ``"policy"``
    (``TransformerPolicy.load``), ``"adapters"`` (folder, :func:`agents.load_adapters`),
    ``"training_state"`` (:func:`agents.load_training_state`), ``"vecnormalize"``, ``"replay_buffer"``.
    """

    steps: int
    manifest: Path
    parts: dict[str, Path] = field(default_factory=dict)

    @property
    def model(self) -> Path | None:
        """The SB3 zip, if this checkpoint has one."""
        return self.parts.get("model")

    @property
    def training_state(self) -> Path | None:
        """The training-state file, if this checkpoint has one."""
        return self.parts.get("training_state")


def manifest_name(name_prefix: str, steps: int) -> str:
    """File name of the manifest of a checkpoint at ``steps`` timesteps."""
    return f"{name_prefix}_manifest_{steps}_steps.json"


def _files(part: Path) -> list[Path]:
    """A part's files: itself, or every file in the folder."""
    return sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]


def write_manifest(directory: str | os.PathLike, name_prefix: str, steps: int, parts: dict[str, Path]) -> Path:
    """Write the manifest that completes a checkpoint; call it after every part is in place.

    :param directory: the checkpoints' folder; every part lies in it.
    :param name_prefix: the checkpoints' file-name prefix.
    :param steps: the checkpoint's timestep count.
    :param parts: kind -> file or folder (see :class:`Checkpoint`).
    :return: the manifest's path.
    :raises OSError: it could not be written (the checkpoint stays incomplete, the previous one intact).
    """
    directory = Path(directory)
    files = {}
    for part in parts.values():
        for file in _files(Path(part)):
            files[file.relative_to(directory).as_posix()] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    manifest = {"format": FORMAT, "version": VERSION, "steps": int(steps),
                "parts": {kind: Path(part).relative_to(directory).as_posix() for kind, part in parts.items()},
                "files": files}
    return atomic_write_bytes(directory / manifest_name(name_prefix, steps), json.dumps(manifest, indent=1).encode())


def verify_checkpoint(manifest: str | os.PathLike) -> Checkpoint:
    """Check every file of a checkpoint against its manifest (size, then SHA-256).

    :param manifest: a manifest written by :func:`write_manifest`.
    :return: the checkpoint.
    :raises ValueError: the manifest is not one (or unreadable JSON), a file is missing, or a file's
        size or SHA-256 differs; the message names the file, the expected and actual values and
        that the file is damaged.
    """
    manifest = Path(manifest)
    try:
        data = json.loads(manifest.read_bytes())
    except (OSError, ValueError) as error:
        raise ValueError(f"{manifest} is not a readable checkpoint manifest ({error}); {DAMAGED}") from error
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{manifest} is not a textgym checkpoint manifest of version {VERSION}; {DAMAGED}")
    directory = manifest.parent
    for name, expected in data["files"].items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{file}, listed in {manifest.name}, is missing; {DAMAGED}")
        size = file.stat().st_size
        if size != expected["size"]:
            raise ValueError(f"{file} has {size} bytes, its manifest {manifest.name} says {expected['size']}; {DAMAGED}")
        digest = sha256_file(file)
        if digest != expected["sha256"]:
            raise ValueError(f"{file} has SHA-256 {digest}, its manifest {manifest.name} says {expected['sha256']}; "
                             f"{DAMAGED}")
    return Checkpoint(int(data["steps"]), manifest, {kind: directory / part for kind, part in data["parts"].items()})


def latest_checkpoint(directory: str | os.PathLike, name_prefix: str = "rl_model") -> Checkpoint | None:
    """The newest complete and whole checkpoint in ``directory`` (what a resumed run should load).

    Checkpoints are tried newest first; one without a manifest (interrupted) is passed over
    silently, one whose files fail :func:`verify_checkpoint` with a ``UserWarning`` naming the damage.
    Checkpoints written before textgym wrote manifests are not listed: load them by their path.

    :param directory: a :class:`agents.RollingCheckpointCallback`'s ``save_path``.
    :param name_prefix: its ``name_prefix``.
    :return: the checkpoint, or ``None`` when the folder holds no complete checkpoint (or does not exist).
    :raises ValueError: there are complete checkpoints but every one is damaged (the first error's message).
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    pattern = re.compile(rf"{re.escape(name_prefix)}_manifest_(\d+)_steps\.json")
    manifests = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := pattern.fullmatch(p.name))),
                       reverse=True)
    errors = []
    for _, manifest in manifests:
        try:
            return verify_checkpoint(manifest)
        except ValueError as error:
            errors.append(error)
            warnings.warn(f"skipping a damaged checkpoint: {error}", stacklevel=2)
    if errors:
        raise ValueError(f"every checkpoint in {directory} is damaged; the newest: {errors[0]}") from errors[0]
    return None
