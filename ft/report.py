"""What backups cost during one `fit`: `SaveStats`, fed by the callback and its writer."""

from __future__ import annotations

import threading
from typing import Any


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


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


def how_often(save_freq: str | int | bool, save_before_preemption: bool) -> str:
    """`every 100 batches`, `at the end of each epoch`, `only before a preemption`."""
    if save_freq is False:
        return "only before a preemption (SIGTERM)"
    often = "at the end of each epoch" if save_freq == "epoch" else f"every {save_freq} batches"
    return often + (" and before a preemption (SIGTERM)" if save_before_preemption else "")


def begin_message(backup_dir: str, often: str, how: str, restored: dict[str, Any] | None) -> str:
    """The line ft logs when `fit` begins: restored from where or starting fresh, and the plan.

    Args:
        backup_dir: Where backups go.
        often: `how_often`'s answer.
        how: How backups are written, e.g. `"in the background"`, `"synchronously"`.
        restored: The callback's `restored` dict, or None when starting fresh.
    """
    if restored is None:
        return f"starting fresh: no backup in {backup_dir}; backing up {often}, {how}"
    return (
        f"restored epoch {restored['epoch']}, batch {restored['batch']} "
        f"(step {restored['step']}) from {restored['path']}; backing up {often} "
        f"to {backup_dir}, {how}"
    )


def end_message(stats: SaveStats, fit_seconds: float, writer: bool, kept: str) -> str:
    """The line ft logs when `fit` ends: what backups were made and what they cost.

    Args:
        stats: This fit's `SaveStats`.
        fit_seconds: Seconds from train begin to train end.
        writer: Whether this process writes backups (else process 0 does).
        kept: What is left in `backup_dir`, e.g. `"backup deleted (delete_checkpoint=True)"`.
    """
    share = 100.0 * stats.blocked_seconds / fit_seconds if fit_seconds > 0 else 0.0
    if writer:
        made = f"{stats.commits} backups committed ({_size(stats.bytes_per_backup)} of state each)"
    else:
        made = "backups written by process 0"
    moved = f"saves moved because one was in flight: {stats.moved_saves}"
    if stats.moved_saves:
        moved += f" (by {stats.moved_steps} steps in all)"
    return (
        f"fit done in {fit_seconds:.1f} s: {made}; training blocked "
        f"{stats.blocked_seconds:.2f} s by backups ({share:.1f}% of fit); {moved}; {kept}"
    )


def what_is_kept(
    kept_final: bool, preempted: bool, dropped: bool, last_saved: int, step: int, directory: str
) -> str:
    """The end line's account of `backup_dir` once `fit` is done (`end_message`'s `kept`).

    Args:
        kept_final: Whether the final state was kept (`delete_checkpoint=False`).
        preempted: Whether `fit` ended for a preemption (the backup stays for the restart).
        dropped: Whether a save still due at the end was not written (the backups go).
        last_saved: Step of the last backup made.
        step: The last step of `fit`.
        directory: Where the backups are.
    """
    if preempted:
        return f"the backup of step {last_saved} is kept for the restart"
    if kept_final:
        return f"kept the final state (step {step}) in {directory}"
    kept = "backups deleted (delete_checkpoint=True)"
    if dropped:
        kept += "; the save due at fit's end was not written"
    return kept


def how_saved(async_save: bool | None, collective: bool, state_bytes: int, threshold: int) -> str:
    """How backups are written: in the background or synchronously, and why."""
    if async_save is None:
        where = "in the background" if state_bytes >= threshold else "synchronously"
        where = f"{where} (state {_size(state_bytes)}; in the background from {_size(threshold)})"
    else:
        where = "in the background" if async_save else "synchronously"
    return f"{where}, every process writing its own shards" if collective else where


def state_nbytes(variables: dict[str, list[Any]]) -> int:
    """Bytes of the training state held in `variables` (group -> Keras variables)."""
    import numpy as np

    total = 0
    for group in variables.values():
        for v in group:
            try:
                itemsize = np.dtype(str(v.dtype)).itemsize
            except TypeError:
                itemsize = 4
            total += int(np.prod(v.shape, dtype=np.int64)) * itemsize
    return total
