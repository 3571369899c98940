"""Backups on a POSIX filesystem: commit by rename, one live run by `flock`.

Layout of `backup_dir` (names in `base`)::

    ft-step-0000000012/      a committed backup, named by its global step
        state/               Orbax checkpoint of the arrays
        ft-backup.json       the record (metadata.BackupRecord), written last
    .ft-tmp-<step>-<id>/     a backup being written: never read, removed on restart
    .ft-trash-<id>/          a replaced backup being deleted: never read
    .ft-damaged-<step>-<id>/ a backup found damaged, moved aside: never read,
                             kept for `python -m ft inspect`
    .ft-lock                 held by the live run (posix_lock)

A backup is written under a temporary name, every file is fsynced and its
size recorded, the record is written and fsynced, and only then is the
directory renamed to its committed name and the parent fsynced. Backups
beyond the newest `max_to_keep` are removed after that, so a SIGKILL at any
moment leaves at least one committed, complete backup (once the first one
exists). A backup found damaged is renamed aside, out of the committed names,
so it never counts as newer than an intact one and never takes an intact
backup's place in the `max_to_keep` kept.

Integrity without reading the files back: `write` records one crc32c per
host array (the CPU's crc32c instruction, on the save pipeline's thread) and
has Orbax write them without a chunk codec (`array_checksums`); OCDBT's nodes
carry their own. At commit only the files that are not OCDBT data files
(Orbax's JSON metadata, manifests) are read back for a CRC32; at restore the
sizes and those CRC32s are checked (`verify`), and each array against its
crc32c as its read lands (`read_arrays`); `verify_all` reads every array too.
Without google-crc32c's C extension, and in backups written before ft
recorded array crc32cs, every chunk carries TensorStore's crc32c codec
instead (`chunk_checksums`). The JAX multi-host collective write keeps the
codec (each process reads and checks its own chunks); a write the codec could
not be added to on some process (another Orbax) gets a CRC32 of every file at
commit, checked by `verify`.

Writing methods are called by the primary process only; reading methods on
every process.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from typing import Any

from ft import errors
from ft.metadata import BackupRecord
from ft.store import array_checksums, posix_files, posix_lock, posix_removal, tensorstore_reads
from ft.store import arrays as array_io
from ft.store.base import (
    ARRAYS,
    DAMAGED_PREFIX,
    RECORD,
    TMP_PREFIX,
    TRASH_PREFIX,
    ReadAll,
    committed_name,
    committed_step,
    ft_owned,
    has_older,
    newest_intact,
)

logger = logging.getLogger("ft")
RECORD_NAME = RECORD


class PosixStore:
    """The backups of one `backup_dir` on a POSIX filesystem (a `base.BackupStore`).

    Args:
        backup_dir: String or path-like, the directory that holds the backups.
        max_to_keep: Positive integer, how many committed backups to keep
            (the newest ones). Defaults to 1.
    """

    def __init__(self, backup_dir: str | os.PathLike[str], max_to_keep: int = 1) -> None:
        self.directory = os.path.abspath(os.fspath(backup_dir))
        self.max_to_keep = max_to_keep
        self._checkpointer: Any = None
        self._reader: Any = None
        self._lock = posix_lock.FlockLock(self.directory)
        # Temporary directory -> the mark of its OCDBT data files (posix_files).
        self._data_mark: dict[str, str] = {}

    # ------------------------------------------------------------------ writer
    def prepare(self) -> None:
        """Create `backup_dir` and prove it writable. Primary process only.

        Raises:
            BackupDirNotWritableError: when it cannot be created or written.
        """
        probe = os.path.join(self.directory, f"{TMP_PREFIX}probe-{uuid.uuid4().hex}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            with open(probe, "wb") as f:
                f.write(b"ft")
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as e:
            raise errors.BackupDirNotWritableError(
                f"backup_dir {self.directory} is not a writable directory ({e.strerror or e}). "
                "Backups could not be saved there: choose a directory this process can "
                "create and write, or fix its permissions, before training."
            ) from e

    def lock(self) -> None:
        """Hold `backup_dir` (`flock`), or raise `BackupDirInUseError`. Primary only."""
        self._lock.acquire()

    def unlock(self) -> None:
        """Release the run's lock. Primary process only."""
        self._lock.release()

    def live_run(self) -> str | None:
        """Who holds the run lock now, or None. Reads only; any process."""
        return self._lock.holder()

    def exists(self) -> bool:
        return os.path.isdir(self.directory)

    def leftovers(self) -> list[str]:
        """Names left by an interrupted save or deletion (removed at the next start)."""
        return sorted(n for n in self._names() if n.startswith((TMP_PREFIX, TRASH_PREFIX)))

    def remove_partial(self) -> None:
        """Delete what an interrupted save or deletion left behind. Primary process only."""
        for name in self._names():
            if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        posix_removal.sweep_siblings(self.directory, TRASH_PREFIX)

    def write(self, record: BackupRecord, arrays: Any) -> str:
        """Commit a backup of `arrays` described by `record`. Primary process only.

        Returns:
            The committed backup's directory. When an intact backup of the same
            step is already committed it is kept as is (same step, same state);
            a damaged one is moved aside and replaced.
        """
        final = self._final(record.step)
        if self._keep_existing(final):
            return final
        tmp = self._new_tmp(record.step)
        self._write_arrays(tmp, arrays, record)
        self._commit(tmp, final, record)
        return final

    def write_collective(
        self, record: BackupRecord, arrays: Any, coordinator: Any, timeout: float
    ) -> str:
        """Commit a backup that every process writes its own shards of. Call on all processes.

        The chief names the temporary directory and tells the others; each
        process writes its shards through Orbax, with a crc32c on every chunk;
        once all have, the chief fsyncs, records the files and commits.
        """
        final = self._final(record.step)
        name = None
        if coordinator.is_chief:
            keep = self._keep_existing(final)
            name = "" if keep else os.path.basename(self._new_tmp(record.step))
        name = coordinator.broadcast("save-dir", name, timeout)
        if not name:
            return final
        tmp = os.path.join(self.directory, name)
        checkpointer = self._collective_orbax(name)  # one per backup: its barriers' names
        try:
            applied = array_io.write(checkpointer, os.path.join(tmp, ARRAYS), arrays, owner=tmp)
        finally:
            checkpointer.close()
        # No process holds every array. Each says whether every chunk it wrote
        # got the crc32c codec; when all did, the chunks check themselves as
        # each process reads its own, and the chief leaves the data files alone
        # (else it checksums every file, all processes', at commit and restore).
        written = coordinator.gather("arrays-written", "1" if applied else "0", timeout)
        if written is not None:  # the chief, once every process has written
            if all(value == "1" for value in written):
                self._data_mark[tmp] = posix_files.CHUNK_CRC32C
            self._commit(tmp, final, record)
        return final

    def _collective_orbax(self, name: str) -> Any:
        """The Orbax checkpointer of the collective write into temporary directory `name`:
        its barriers are named after it, the same on every process."""
        return array_io.new_checkpointer(barrier_prefix=f"ft-{name}")

    def _keep_existing(self, final: str) -> bool:
        """Whether `final` holds an intact backup; a damaged one is moved aside.

        Every array is read (rare: a step is saved twice only around a resume).
        """
        if not os.path.isdir(final):
            return False
        try:
            self.verify_all(final)
        except errors.CheckpointCorruptedError as e:
            self.set_aside(final, e)
            return False
        return True

    def _final(self, step: int) -> str:
        return os.path.join(self.directory, committed_name(step))

    def _new_tmp(self, step: int) -> str:
        tmp = os.path.join(self.directory, f"{TMP_PREFIX}{step}-{uuid.uuid4().hex[:12]}")
        os.makedirs(tmp)
        return tmp

    def _write_arrays(self, tmp: str, arrays: Any, record: BackupRecord | None = None) -> None:
        """Write `arrays` under `tmp`; with the `record` of a backup this process holds
        whole, one crc32c per array goes into it (or, without google-crc32c's C
        extension, a crc32c into every chunk). Save pipeline's thread."""
        directory = os.path.join(tmp, ARRAYS)
        if record is not None and array_checksums.usable(arrays):
            record.array_crc32c = array_checksums.of_arrays(arrays)
            array_io.write(self._orbax(), directory, arrays, owner=tmp, chunk_crc=False)
            self._data_mark[tmp] = posix_files.ARRAY_CRC32C
            return
        applied = array_io.write(self._orbax(), directory, arrays, owner=tmp)
        if record is not None and applied:
            self._data_mark[tmp] = posix_files.CHUNK_CRC32C

    def _commit(self, tmp: str, final: str, record: BackupRecord) -> None:
        """fsync every file, record sizes (and CRC32s), write the record, rename. Primary only."""
        record.files = posix_files.sync_and_sum(tmp, self._data_mark.pop(tmp, None))
        with open(os.path.join(tmp, RECORD_NAME), "w", encoding="utf-8") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        posix_files.fsync_path(tmp, directory=True)
        os.rename(tmp, final)
        posix_files.fsync_path(self.directory, directory=True)
        # Only committed names count: a damaged backup was moved aside and
        # never takes the place of an intact one.
        for older in self.committed()[self.max_to_keep :]:
            self._discard(older)

    def set_aside(self, path: str, reason: Exception) -> str:
        """Rename the damaged backup `path` out of the committed names. Primary process only.

        It is kept (for `python -m ft inspect`) until `delete` or the user
        removes it, and is never read again.

        Returns:
            Its new directory.
        """
        step = committed_step(os.path.basename(path)) or 0
        aside = os.path.join(self.directory, f"{DAMAGED_PREFIX}{step}-{uuid.uuid4().hex[:12]}")
        os.rename(path, aside)
        posix_files.fsync_path(self.directory, directory=True)
        logger.warning(
            "Moved the damaged backup %s aside to %s; it will not be loaded. "
            "Inspect it with `python -m ft inspect %s`, then delete it. Cause: %s",
            path,
            aside,
            self.directory,
            reason,
        )
        return aside

    def damaged(self) -> list[str]:
        """Backups moved aside as damaged, highest step first. Call on any process."""
        found = []
        for name in self._names():
            if name.startswith(DAMAGED_PREFIX):
                step = name[len(DAMAGED_PREFIX) :].split("-", 1)[0]
                found.append((int(step) if step.isdigit() else -1, name))
        return [os.path.join(self.directory, n) for _, n in sorted(found, reverse=True)]

    def delete(self) -> None:
        """Remove every file ft wrote, never the user's own. Primary process only.

        This includes backups moved aside as damaged: the run that owned
        them completed. `backup_dir` itself is removed only when nothing else
        is left in it: it is then renamed aside at once (`posix_removal`) and
        its bytes removed on a background thread (`background_removal`);
        otherwise ft's entries are removed here.
        """
        if not os.path.isdir(self.directory):
            return
        names = self._names()
        if all(ft_owned(n) or n == posix_lock.LOCK_NAME for n in names):
            aside = posix_removal.move_aside(self.directory, TRASH_PREFIX)  # lock held
            if aside is not None:
                self._lock.release()
                posix_removal.remove_in_background(aside)
                return
        for name in names:
            if ft_owned(name):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._lock.release()
        lock = os.path.join(self.directory, posix_lock.LOCK_NAME)
        if os.path.exists(lock):
            os.remove(lock)
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # the user keeps files of their own there

    def _discard(self, path: str) -> None:
        trash = os.path.join(self.directory, f"{TRASH_PREFIX}{uuid.uuid4().hex[:12]}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------- readers
    def committed(self) -> list[str]:
        """Committed backup directories, newest first. Call on any process."""
        found = []
        for name in self._names():
            step = committed_step(name)
            if step is not None and os.path.isdir(os.path.join(self.directory, name)):
                found.append((step, os.path.join(self.directory, name)))
        return [path for _, path in sorted(found, reverse=True)]

    def latest(self, read_all: ReadAll = False) -> tuple[str, BackupRecord] | None:
        """The newest intact backup and its record, or None when there is none.

        Primary process only. Each backup is checked by `verify` (listing,
        sizes, CRC32s of the small files), or by `verify_all` (every array
        read too) when `read_all`. Damaged backups newer than the newest intact one are moved
        aside (`set_aside`), so the next save of their step replaces them and
        they never push an intact backup out of the `max_to_keep` kept. When
        none is intact, nothing is moved and the newest one's damage is raised.

        Raises:
            CheckpointCorruptedError: when backups exist but none is intact.
        """
        return newest_intact(self, read_all)

    def older_than(self, path: str) -> bool:
        """Whether a committed backup older than `path` exists. Call on any process."""
        return has_older(self, path)

    def read_record(self, path: str) -> BackupRecord:
        """The record of the backup in `path`, without checking its data files."""
        record_path = os.path.join(path, RECORD_NAME)
        try:
            with open(record_path, encoding="utf-8") as f:
                return BackupRecord.from_json(f.read())
        except (OSError, ValueError) as e:
            raise self._corrupted(path, record_path, f"its record cannot be read ({e})") from e

    def verify(self, path: str) -> BackupRecord:
        """Check the backup in `path` up to its array bytes; return its record.

        Any process. Every recorded file must exist with its recorded size,
        and every file with a recorded CRC32 must match it. The bytes of OCDBT
        data files covered by the arrays' crc32cs (or their chunks') are left
        to `read_arrays`, which checks them as it reads them; `verify_all`
        reads them too.

        Raises:
            CheckpointCorruptedError: naming the backup directory and the first
                missing, truncated or altered file.
        """
        record = self.read_record(path)
        problem = posix_files.check(path, record.files, array_crcs=bool(record.array_crc32c))
        if problem is not None:
            raise self._corrupted(path, *problem)
        return record

    def verify_all(self, path: str) -> BackupRecord:
        """`verify`, then read every array, checking its crc32c (or each chunk's). Any process.

        Reads through TensorStore directly, several arrays at a time (their
        chunks in parallel), with no Orbax call: Orbax's restore is a collective under
        JAX multi-host, and this runs on the chief alone. For
        `python -m ft inspect`, the chief of a multi-process restore, and a
        save of a step that is already committed.
        """
        record = self.verify(path)
        state = os.path.join(path, ARRAYS)
        try:
            tensorstore_reads.read_every(
                {"driver": "file", "path": state + "/"}, record.array_crc32c
            )
        except (OSError, ValueError) as e:
            raise self._corrupted(path, state, f"its arrays cannot be read ({e})") from e
        return record

    def read_arrays(self, path: str, target: Any) -> Any:
        """Load the arrays of the backup in `path` shaped like `target`. Any process.

        Several arrays and chunks are read at once; each array is checked
        against the crc32c in the backup's record as soon as it lands (or
        TensorStore checks every chunk's crc32c as it decodes it, in backups
        written with the codec), and OCDBT's nodes against theirs.

        Raises:
            CheckpointCorruptedError: when an array, a chunk or an index fails
                its checksum, or a file is short or missing.
        """
        crcs = self.read_record(path).array_crc32c
        try:
            return array_io.read(self._orbax_reader, os.path.join(path, ARRAYS), target, crcs)
        except Exception as e:
            # TensorStore reports a checksum mismatch as DATA_LOSS, a short
            # file as OUT_OF_RANGE, a missing one as NOT_FOUND (ValueError);
            # Orbax raises a bare Exception from it for a sharded read.
            cause = array_io.storage_error(e)
            if cause is None:
                raise
            raise self._corrupted(
                path, os.path.join(path, ARRAYS), f"its arrays cannot be read ({cause})"
            ) from e

    # ----------------------------------------------------------------- helpers
    def _names(self) -> list[str]:
        try:
            return os.listdir(self.directory)
        except FileNotFoundError:
            return []

    def _orbax(self) -> Any:
        if self._checkpointer is None:
            self._checkpointer = array_io.new_checkpointer()
        return self._checkpointer

    def _orbax_reader(self) -> Any:
        if self._reader is None:
            self._reader = array_io.new_handler()
        return self._reader

    def _corrupted(self, path: str, file_path: str, why: str) -> errors.CheckpointCorruptedError:
        return errors.CheckpointCorruptedError(
            f"The backup {path} in backup_dir {self.directory} is damaged: file "
            f"{file_path}: {why}. It was not loaded. Restore the file, or delete "
            f"{path} to resume from an older backup (or from scratch when there is none)."
        )

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
