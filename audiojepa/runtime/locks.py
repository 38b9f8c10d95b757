"""Exclusive run locks on folders: one writer at a time for a shard set's output or a training workdir.

`exclusive_lock(lock_file, on_held=...)` holds an flock on `lock_file` for a block, and fails at once (it never
waits) with the error `on_held(holder_pid)` builds when another process, or this one, holds it.
The kernel frees the lock of a process that dies, so a killed run never leaves its folder locked; the file
holds the holder's pid and is removed when the block ends. Local (or mounted) folders only: an object store
(gs://) has no such lock, see audiojepa.training.train.workdir_lock for what a bucket workdir does instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator

from audiojepa.runtime import storage


class RunLockedError(RuntimeError):
    """Another run holds the lock of the folder this run would write."""


@contextlib.contextmanager
def exclusive_lock(lock_file: str, *, on_held: Callable[[str], Exception]) -> Iterator[str]:
    """Holds an exclusive flock on `lock_file` for the block; yields its path.

    Args:
        lock_file: the lock file (created if missing; its folder must exist).
        on_held: builds the error raised when the lock is held, from the holder's pid (a string, "unknown"
            if the file holds none); the message should name the guarded folder and `lock_file`.
    """
    if storage.is_url(lock_file):
        raise ValueError(f"{lock_file}: a lock file must be on a local or mounted filesystem (flock), not a URL")
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise on_held(holder) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            if os.stat(lock_file).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a run that just ended removed the file we locked: lock the one at `lock_file` now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield lock_file
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_file)  # while still locked, so no other run holds a lock on a removed file
        os.close(fd)
