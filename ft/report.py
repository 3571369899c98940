"""What backups cost during one `fit`: `SaveStats`, fed by the callback and its writer."""

from __future__ import annotations

import threading


class SaveStats:
    """Counters of one `fit`'s backups, for the line ft logs at train end.

    `BackupAndRestore` owns one per `fit`. The training thread reports the time
    it was blocked by backups (`add_blocked`) and the saves it moved to a later
    step because one was still in flight (`add_moved`); whoever commits a
    backup (the training thread or the background writer) reports it with
    `add_commit`. The methods are thread-safe.

    Attributes:
        commits: Integer, the backups committed.
        blocked_seconds: Float, seconds the training thread waited for backups
            (snapshots, synchronous writes, waits for a save in flight).
        moved_saves: Integer, the saves moved to a later step because a save
            was still in flight.
        moved_steps: Integer, the steps those saves were moved by, in total.
        commit_seconds: Float, seconds spent writing and committing backups,
            in the foreground or the background.
        bytes_committed: Integer, the bytes of every committed backup.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.commits: int = 0
        self.blocked_seconds: float = 0.0
        self.moved_saves: int = 0
        self.moved_steps: int = 0
        self.commit_seconds: float = 0.0
        self.bytes_committed: int = 0

    def add_blocked(self, seconds: float) -> None:
        """Adds `seconds` the training thread was blocked by a backup."""
        with self._lock:
            self.blocked_seconds += float(seconds)

    def add_commit(self, nbytes: int, seconds: float) -> None:
        """Counts one committed backup of `nbytes` bytes that took `seconds` to write."""
        with self._lock:
            self.commits += 1
            self.bytes_committed += int(nbytes)
            self.commit_seconds += float(seconds)

    def add_moved(self, steps: int) -> None:
        """Counts one save moved `steps` steps later because another was in flight."""
        with self._lock:
            self.moved_saves += 1
            self.moved_steps += int(steps)

    @property
    def bytes_per_backup(self) -> int:
        """Integer, the mean size of a committed backup in bytes (0 before the first)."""
        with self._lock:
            return self.bytes_committed // self.commits if self.commits else 0
