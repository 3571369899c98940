"""One live training run per POSIX `backup_dir`: an `flock` held for the whole run.

Primary process only. The lock is an `flock` on `backup_dir/.ft-lock`: the
kernel drops it when the holder dies, SIGKILL included, so a crashed run never
blocks its own restart. Within one process the lock is re-entrant. A `fit`
that raises releases it once its save in flight has committed, so the next
`fit` (the reference page's own example calls it again) takes it afresh.
"""

from __future__ import annotations

import fcntl
import os

from ft import errors

LOCK_NAME = ".ft-lock"

# realpath of the lock file -> open descriptor holding the flock, in this process.
_held: dict[str, int] = {}


def acquire(directory: str) -> None:
    """Hold the lock of `directory` or raise `BackupDirInUseError`."""
    path = os.path.realpath(os.path.join(directory, LOCK_NAME))
    if path in _held:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        os.close(fd)
        raise errors.BackupDirInUseError(
            f"backup_dir {directory} is in use by another live training run "
            f"(lock {path}, held by {holder}). Two runs on one backup_dir would "
            "overwrite each other's backups: give each run its own backup_dir, or "
            "stop the other run first."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    _held[path] = fd


def release(directory: str) -> None:
    """Release the lock of `directory` if this process holds it."""
    path = os.path.realpath(os.path.join(directory, LOCK_NAME))
    fd = _held.pop(path, None)
    if fd is not None:
        os.close(fd)


def holder(directory: str) -> str | None:
    """Who holds the lock of `directory`, or None when no live run does. Reads only."""
    path = os.path.join(directory, LOCK_NAME)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class FlockLock:
    """The `base.RunLock` of a POSIX `backup_dir`. Primary process only."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def acquire(self) -> None:
        acquire(self.directory)

    def release(self) -> None:
        release(self.directory)

    def holder(self) -> str | None:
        return holder(self.directory)
