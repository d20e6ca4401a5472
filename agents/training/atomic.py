"""Atomic writes: a file or folder appears under its final name complete, or not at all.

A process killed while writing (``kill -9``, a power cut) or a write that fails (disk full, no
permission) must not leave a half-written checkpoint under a name a later run would load. Every
writer here writes under a temporary name in the same folder (a rename is atomic only within one
file system), flushes it to disk, renames it into place with ``os.replace`` and then flushes the
folder, so that the rename itself survives a power cut. Temporary names start with
:data:`TEMP_PREFIX`, which no checkpoint name matches; a failed write removes its temporary.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TEMP_PREFIX = ".tmp-"
"""Start of every temporary name (hidden, never matched by a checkpoint's name pattern)."""


def fsync_directory(directory: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, new files) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders: the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _write_failed(path: Path, error: OSError) -> OSError:
    """An ``OSError`` of the same kind that names the final path and says what is left."""
    message = (f"could not write {path}: {error.strerror or error}; nothing was replaced (a previous file of that "
               "name is intact): free disk space or fix the folder's permissions and save again")
    return type(error)(error.errno, message) if error.errno is not None else OSError(message)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``path`` to write; on success it replaces ``path`` atomically.

    The temporary name keeps ``path``'s suffix (SB3's ``model.save`` appends ``.zip`` to a name
    without it). On any exception the temporary is removed and the exception propagates, an
    ``OSError`` re-raised naming ``path``.

    :param path: the final file; its folder is created if missing.
    :raises OSError: the folder could not be created or written, the disk is full, or the rename failed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.stem}-", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise _write_failed(path, error) from error
    temporary = Path(name)
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise _write_failed(path, error) from error
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`).

    :param path: the final file.
    :param data: its whole content.
    :return: ``path`` as a ``pathlib.Path``.
    :raises OSError: the write failed; ``path`` is unchanged.
    """
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, merge: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path`` to fill; on success it replaces ``path``.

    A folder cannot replace a non-empty folder in one rename: an existing ``path`` is first renamed
    aside, then the new folder renamed in, then the old one deleted. A kill between the two renames
    leaves the old folder under a temporary name and no ``path`` (never a half-written ``path``).
    With ``merge=True`` an existing ``path`` keeps its other files: the new files are renamed into
    it one by one (each whole, the set not atomic); a new ``path`` is still renamed in at once.

    :param path: the final folder; its parent is created if missing.
    :param merge: keep the files of an existing ``path`` that the new folder does not replace.
    :raises OSError: writing or renaming failed; ``path`` is unchanged and the temporary removed.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{path.name}-", dir=path.parent))
    except OSError as error:
        raise _write_failed(path, error) from error
    try:
        yield temporary
        for file in temporary.rglob("*"):
            if file.is_file():
                _fsync_file(file)
        fsync_directory(temporary)
        old = None
        if merge and path.is_dir():
            _merge_into(temporary, path)
        else:
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}old-{path.name}-", dir=path.parent))
                os.replace(path, old)  # onto the empty folder just made: an atomic rename on POSIX
            try:
                os.replace(temporary, path)
            except OSError:
                if old is not None:
                    os.replace(old, path)  # put the previous folder back
                raise
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_failed(path, error) from error
        raise
    fsync_directory(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _merge_into(source: Path, target: Path) -> None:
    """Rename every file of ``source`` into the same place under ``target``, then remove ``source``."""
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        destination = target / file.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(file, destination)
    shutil.rmtree(source)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes, hex, read in chunks (checkpoints reach gigabytes).

    :param path: the file.
    :param chunk_bytes: bytes read at a time.
    :raises OSError: the file cannot be read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
