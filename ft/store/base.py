"""What every backup store offers, and the layout they share.

A store keeps the backups of one `backup_dir`. Storage kinds differ in two
things only, kept apart the way Orbax keeps its atomicity strategies apart:

- how a backup is committed: by renaming a temporary directory into place
  (POSIX paths, `posix.PosixStore`), or, where there is no atomic rename
  (`gs://`, `s3://`), by a marker object written last that readers require;
- how one live run holds `backup_dir`: an `flock` the kernel drops when the
  holder dies (`posix_lock`), or a lease object with an expiry.

Everything else (what a backup holds, how it is checked, which are kept,
falling back from a damaged one) is the same for every kind, and the callback
and `python -m ft inspect` use only the `BackupStore` protocol below, opened
by `ft.store.open_store`. A new kind implements the protocol (arrays through
`arrays`, which Orbax/TensorStore write to any path their drivers know) and
is added to `open_store`; the callback does not change.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol

from ft import errors
from ft.metadata import FILENAME as RECORD_NAME
from ft.metadata import BackupRecord

# `BackupStore.latest`'s `read_all`: a flag, or a test of a backup's record.
ReadAll = bool | Callable[[BackupRecord], bool]

PREFIX = "ft-step-"  # a committed backup: ft-step-<step, 10 digits>
TMP_PREFIX = ".ft-tmp-"  # a backup being written: never read, removed at the next start
TRASH_PREFIX = ".ft-trash-"  # a backup being deleted: never read
DAMAGED_PREFIX = ".ft-damaged-"  # a backup found damaged, moved aside: kept for inspect
ARRAYS = "state"  # the Orbax checkpoint inside a backup
RECORD = RECORD_NAME  # the JSON record inside a backup, written last
_COMMITTED = re.compile(r"^ft-step-(\d+)$")


def committed_step(name: str) -> int | None:
    """The step of a committed backup's name, or None for any other name."""
    match = _COMMITTED.match(name)
    return int(match.group(1)) if match else None


def committed_name(step: int) -> str:
    return f"{PREFIX}{step:010d}"


def ft_owned(name: str) -> bool:
    """Whether `name` in `backup_dir` is one ft writes (and `delete` removes)."""
    return committed_step(name) is not None or name.startswith(
        (TMP_PREFIX, TRASH_PREFIX, DAMAGED_PREFIX)
    )


class RunLock(Protocol):
    """Holds `backup_dir` for one live training run. Primary process only."""

    def acquire(self) -> None:
        """Hold it, or raise `BackupDirInUseError` naming the holder."""
        ...

    def release(self) -> None:
        """Stop holding it (a no-op when not held)."""
        ...

    def holder(self) -> str | None:
        """Who holds it now, or None. Reads only; for `python -m ft inspect`."""
        ...


class BackupStore(Protocol):
    """The backups of one `backup_dir`.

    Paths are strings in the store's own namespace (a directory, or a bucket
    prefix); the callback only passes them back. Writing methods are called by
    the primary process only, reading methods by any process, and
    `write_collective` by all.
    """

    directory: str  # where the backups are, as shown to people
    max_to_keep: int  # committed backups kept, newest first

    def prepare(self) -> None:
        """Create `backup_dir` and prove it writable, or raise `BackupDirNotWritableError`."""
        ...

    def lock(self) -> None:
        """Hold `backup_dir` for this run, or raise `BackupDirInUseError`. Primary only."""
        ...

    def unlock(self) -> None:
        """Release what `lock` took. Primary only."""
        ...

    def remove_partial(self) -> None:
        """Delete what an interrupted save or deletion left. Primary only."""
        ...

    def write(self, record: BackupRecord, arrays: Any) -> str:
        """Commit a backup of host `arrays`; keep the newest `max_to_keep`. Primary only."""
        ...

    def write_collective(
        self, record: BackupRecord, arrays: Any, coordinator: Any, timeout: float
    ) -> str:
        """Commit a backup every process writes its shards of. Call on all processes.

        `arrays` are global JAX arrays (a snapshot's copies or the live ones);
        `coordinator` is the one of the calling thread (`for_thread` on the
        save pipeline's). Every wait of the write is bounded by `timeout`.
        """
        ...

    def latest(self, read_all: ReadAll = False) -> tuple[str, BackupRecord] | None:
        """The newest intact backup, moving damaged newer ones aside. Primary only.

        `read_all` (a flag, or a test of a backup's record): read every array
        of a backup too (`verify_all`), not only what `verify` checks.

        Raises:
            CheckpointCorruptedError: when backups exist but none is intact.
        """
        ...

    def older_than(self, path: str) -> bool:
        """Whether a committed backup older than `path` exists."""
        ...

    def set_aside(self, path: str, reason: Exception) -> str:
        """Move a damaged backup out of the committed ones, keeping it. Primary only."""
        ...

    def read_record(self, path: str) -> BackupRecord:
        """The record of a backup, or `CheckpointCorruptedError`."""
        ...

    def read_arrays(self, path: str, target: Any) -> Any:
        """Its arrays shaped like `target`, checked as read, or `CheckpointCorruptedError`."""
        ...

    def verify(self, path: str) -> BackupRecord:
        """Check what can be checked without reading the arrays; return the record."""
        ...

    def verify_all(self, path: str) -> BackupRecord:
        """Check everything, every array byte included; return the record."""
        ...

    def committed(self) -> list[str]:
        """Committed backups, newest first."""
        ...

    def damaged(self) -> list[str]:
        """Backups moved aside as damaged, highest step first."""
        ...

    def leftovers(self) -> list[str]:
        """Names left by interrupted saves or deletions."""
        ...

    def exists(self) -> bool:
        """Whether `backup_dir` exists at all."""
        ...

    def live_run(self) -> str | None:
        """Who holds `backup_dir` now, or None. Reads only."""
        ...

    def delete(self) -> None:
        """Remove everything ft wrote there, never the user's own files. Primary only."""
        ...

    def close(self) -> None:
        """Release the store's resources (Orbax's checkpointer)."""
        ...


def newest_intact(store: BackupStore, read_all: ReadAll) -> tuple[str, BackupRecord] | None:
    """`store.latest`, written once for every kind of store. Primary process only.

    Each committed backup, newest first, is checked by `verify` (then by
    `verify_all` when `read_all` is True or says so of its record). Damaged
    backups newer than the newest intact one are set aside (`set_aside`), so
    the next save of their step replaces them and they never push an intact
    backup out of the `max_to_keep` kept. When none is
    intact, nothing is set aside and the newest one's damage is raised.
    """
    damaged: list[tuple[str, errors.CheckpointCorruptedError]] = []
    for path in store.committed():
        try:
            record = store.verify(path)
            if read_all is True or (callable(read_all) and read_all(record)):
                record = store.verify_all(path)
        except errors.CheckpointCorruptedError as e:
            damaged.append((path, e))
            continue
        for bad, why in damaged:
            store.set_aside(bad, why)
        return path, record
    if damaged:
        raise damaged[0][1]
    return None


def has_older(store: BackupStore, path: str) -> bool:
    """`store.older_than`: whether a committed backup older than `path` exists."""
    committed = store.committed()
    return path in committed and committed.index(path) < len(committed) - 1
