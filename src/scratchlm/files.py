"""Atomic writes of files and folders: a crash at any moment leaves the old content or the new, never half.

Everything goes to a temporary name beside its target, is fsynced, and is then renamed over the target
(``os.replace`` is atomic on POSIX); the parent folder is fsynced too, so that the rename survives a power
cut. On an exception the temporary copy is removed. Only a process killed outright leaves one behind, under a
name its owner recognises and cleans up at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; when the block ends without error, the file is fsynced
    and renamed to ``path``. ``fsync=False`` for many small files whose loss in a power cut is harmless: the
    rename alone still protects them from a killed process."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes, fsync: bool = True) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, fsync) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


@contextmanager
def atomic_dir(path: str | Path, tmp: str | Path | None = None, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder (``tmp``, default ``PATH.tmp``) to fill; when the block ends without
    error, every file in it is fsynced and the folder renamed to ``path``.

    An existing ``path`` is replaced, or, with ``replace=False``, kept and the new copy dropped (another
    writer finished the same content first).
    """
    path = Path(path)
    tmp = Path(tmp) if tmp is not None else path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        fsync_dir(tmp)
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise
            shutil.rmtree(tmp)  # someone else's complete copy is there: keep it
            return
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (none if it is missing); a half-written line (a process that died
    mid-write) is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
