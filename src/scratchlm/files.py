"""Atomic writes of files and folders: a crash at any moment leaves the old content or the new, never half.

Everything goes to a temporary name beside its target, is fsynced, and is then renamed over the target
(``os.replace`` is atomic on POSIX); the parent folder is fsynced too, so that the rename survives a power
cut. On an exception the temporary copy is removed. Only a process killed outright leaves one behind, under a
name its owner recognises and cleans up at the next start.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("scratchlm.files")


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
    """The records of a JSON-lines file (none if it is missing). A line that is not a JSON object (bytes that
    are not UTF-8, a record half-written when a process died, on the last line or, after a resume, in the
    middle) is skipped with a warning naming the file and the line."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif raw.strip():
            log.warning("%s line %d is not a JSON record (damaged, or half-written when a process died): "
                        "skipped", path, number)
    return records


LOCK_STALE_S = 60.0
"""A build lock untouched for this long belongs to a builder that died (on this machine or another)."""
LOCK_HEARTBEAT_S = 5.0


@contextmanager
def build_lock(lock: Path, what: str, poll_s: float = 0.5, stale_s: float = LOCK_STALE_S) -> Iterator[None]:
    """Hold the claim on building ``what`` (a cache folder), so that two processes never build it at once: a
    second one waits here until the first is done, then (holding the claim in turn) finds the work done. The
    caller checks, inside, whether there is anything left to build.

    The claim is the file ``lock``, created with O_CREAT | O_EXCL: atomic on a local disk and on NFS v3 and
    later, where ``flock`` may not hold across machines. It holds the owner's pid and host, and the owner
    touches it every few seconds; a waiter takes over a claim whose owner is gone (its pid, on this host) or
    that nobody has touched for ``stale_s`` (an owner on another machine that died). A waiter says once that
    it waits, and for whom.
    """
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    said = False
    while not _claim(lock):
        owner = _read_owner(lock)
        if _stale(lock, owner, stale_s):
            _take_over(lock)
            continue
        if not said:
            log.info("waiting for %s, which another process is building (pid %s on %s)", what,
                     owner.get("pid", "?"), owner.get("host", "?"))
            said = True
        time.sleep(poll_s)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True, name="scratchlm-build-lock")
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        lock.unlink(missing_ok=True)


def _claim(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    return True


def _read_owner(lock: Path) -> dict:
    try:
        owner = json.loads(lock.read_text())
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}  # gone, or being written: looked at again at the next poll


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine is running (someone else's counts: it exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(lock: Path, owner: dict, stale_s: float) -> bool:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: claim it at the next turn
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
        if not pid_alive(owner["pid"]):
            return True
    return age > stale_s


def _take_over(lock: Path) -> None:
    """Move a dead owner's claim aside (a rename: of two waiters doing this, one wins) and drop it."""
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    log.warning("took over building from a process that stopped (%s)", _read_owner(aside) or "unknown")
    aside.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(LOCK_HEARTBEAT_S):
        try:
            os.utime(lock)
        except FileNotFoundError:
            return


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes, read 16 MiB at a time (what cache shards record beside their sizes)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 * 2**20):
            crc = zlib.crc32(block, crc)
    return crc
