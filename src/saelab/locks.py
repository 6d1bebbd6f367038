"""Advisory locks on the folders saelab writes: run folders, activation stores, the model cache.

``hold_lock(path, what)`` takes an exclusive ``flock`` on a lock file *beside* the folder
(``<parent>/.<name>.lock``, so the folder itself stays untouched and may not exist yet). The
lock file records the holder's pid, what it is doing and its command line, so a second process
is told who holds the folder. The kernel drops a ``flock`` when its holder dies, so a crashed
process never leaves a stale lock behind; the file is deleted on release.

Locks are re-entrant within one process (a nested ``hold_lock`` on the same path just counts)
and advisory: they only keep saelab processes apart. Where ``fcntl`` is missing (Windows),
``hold_lock`` does nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from saelab.errors import LockedError, NotWritableError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

POLL_SECONDS = 0.2
# lock file -> [fd, depth, owner pid]; the pid guards against a forked child inheriting entries
_HELD: dict[str, list[int]] = {}


def lock_file(path: str | os.PathLike) -> Path:
    """The lock file guarding ``path``: ``<parent>/.<name>.lock``."""
    path = Path(path).expanduser().absolute()
    return path.parent / f".{path.name}.lock"


def holder(path: str | os.PathLike) -> dict | None:
    """What the lock file of ``path`` says about its holder (None if unreadable or absent)."""
    try:
        info = json.loads(lock_file(path).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(path: Path, info: dict | None) -> str:
    if not info:
        return f"{path} is in use by another saelab process"
    return f"{path} is in use by saelab pid {info.get('pid', '?')} ({info.get('what', '?')})"


def _try_lock(lock: Path) -> int | None:
    """An fd holding the lock on ``lock`` (the file currently at that path), or None if busy."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise NotWritableError(
                f"cannot create the lock file {lock} ({e.strerror}): choose a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        # the previous holder may have deleted the file between our open and flock: then we
        # hold a lock on an orphan inode and must retry on the file now at the path
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def hold_lock(
    path: str | os.PathLike,
    what: str,
    wait: bool = False,
    timeout: float | None = None,
    hint: str = "wait for it or choose another --out",
) -> Iterator[Path]:
    """Hold the advisory lock on folder ``path`` for the duration of the block.

    ``what`` says what this process does with it (shown to others: "train", "harvest").
    Busy: raise :class:`LockedError` naming the holder's pid (``wait=False``), or print a
    one-line note and wait for it, at most ``timeout`` seconds (``wait=True``). Yields the
    lock file's path.
    """
    path = Path(path)
    lock = lock_file(path)
    key = str(lock)
    held = _HELD.get(key)
    if fcntl is None or (held is not None and held[2] == os.getpid()):
        if held is not None:
            held[1] += 1
        try:
            yield lock
        finally:
            if held is not None:
                held[1] -= 1
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise NotWritableError(
            f"cannot create {lock.parent} ({e.strerror}): choose a writable folder"
        ) from None
    fd = _try_lock(lock)
    if fd is None:
        info = holder(path)
        if not wait:
            raise LockedError(f"{_describe(path, info)}; {hint}")
        print(f"note: {_describe(path, info)}; waiting for it", file=sys.stderr, flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while fd is None:
            if deadline is not None and time.monotonic() > deadline:
                raise LockedError(
                    f"{_describe(path, holder(path))} (waited {timeout:g} s); {hint}"
                )
            time.sleep(POLL_SECONDS)
            fd = _try_lock(lock)
    try:
        record = {
            "pid": os.getpid(),
            "what": what,
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv),
        }
        with contextlib.suppress(OSError):  # the record is informative only
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _HELD[key] = [fd, 1, os.getpid()]
        yield lock
    finally:
        _HELD.pop(key, None)
        # delete before unlocking: a waiter that then locks the orphan inode notices and retries
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
