"""Backups in a bucket (`gs://`, `s3://`): committed by a marker object written last.

Layout under `backup_dir`::

    ft-step-0000000012/         a backup, named by its global step
        arrays/...              the arrays (bucket_arrays: zarr3 on TensorStore)
        ft-backup.json          the record (metadata.BackupRecord)
        ft-commit.json          the marker: written last, commits the backup
        ft-damaged.json         instead of the marker: found damaged, set aside,
                                never read, kept for `python -m ft inspect`
    .ft-lease-0000000003        held by the live run (bucket_lease)

Object stores have no atomic rename, so a backup is written in place and
committed the way Orbax commits on GCS: every array is written, the listing
is checked against what was written (each array's metadata and every chunk
present), the record is written with every object's size (and a CRC32 of the
small metadata objects), and only then the marker, which holds the record's
size and CRC32. Readers ignore a backup without its marker; the next run
deletes it. Older backups lose their marker before their objects, so a
SIGKILL at any moment leaves at least one committed, complete backup (once
the first one exists). Nothing is loaded unverified: the marker checks the
record, the record the listing and the metadata objects, and every chunk's
crc32c is checked by TensorStore as it is read.

Writing methods are called by the primary process only (`write_collective`
by all); reading methods on every process.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import numpy as np

from ft import errors
from ft.log import get_logger
from ft.metadata import BackupRecord
from ft.store import background_removal, bucket_arrays, bucket_lease, bucket_record
from ft.store.base import ReadAll, has_older, newest_intact
from ft.store.bucket_lease import PREFIX as LEASE_PREFIX
from ft.store.bucket_lease import Lease
from ft.store.bucket_paths import BucketURL, filesystem
from ft.store.bucket_record import MARKER

logger = get_logger()

PREFIX = "ft-step-"
DAMAGED = "ft-damaged.json"
PROBE_PREFIX = ".ft-probe-"
_COMMITTED = re.compile(r"^ft-step-(\d+)$")
_DAMAGE_STATUSES = (
    "DATA_LOSS",
    "OUT_OF_RANGE",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "INVALID_ARGUMENT",
)


class BucketStore:
    """The backups of one bucket `backup_dir`.

    Args:
        backup_dir: String, `gs://BUCKET/PREFIX` or `s3://BUCKET/PREFIX`.
        max_to_keep: Integer, how many committed backups to keep. Defaults to 1.
    """

    def __init__(self, backup_dir: str, max_to_keep: int = 1) -> None:
        self.location = BucketURL.parse(backup_dir)
        self.directory = self.location.url
        self.max_to_keep = max_to_keep
        self.fs = filesystem(self.location.scheme)
        self._lease: Lease | None = None
        self._context: Any = None

    # --------------------------------------------------------------- helpers
    def _name(self, path: str) -> str:
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if not _COMMITTED.match(name):
            raise ValueError(f"{path} is not a backup of {self.directory}")
        return name

    def _url(self, name: str) -> str:
        return self.location.child_url(name)

    def _ts_context(self) -> Any:
        if self._context is None:
            import tensorstore as ts

            self._context = ts.Context()
        return self._context

    def _names(self) -> list[str]:
        root = self.location.fs_path()
        self.fs.invalidate_cache(root)
        try:
            entries = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        return sorted({str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries})

    def _objects(self, name: str) -> dict[str, int]:
        """Relative key -> size of every object of backup `name`, listed afresh."""
        root = self.location.fs_path(name)
        self.fs.invalidate_cache(root)
        found = self.fs.find(root, detail=True)
        return {
            key[len(root) + 1 :]: int(info["size"])
            for key, info in found.items()
            if info.get("type", "file") == "file" and key.startswith(root + "/")
        }

    def _remove(self, name: str) -> None:
        """Delete backup `name`: its marker first, so it is never half-committed."""
        self._remove_marker(name)
        root = self.location.fs_path(name)
        self.fs.invalidate_cache(root)
        try:
            self.fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass

    def _remove_marker(self, name: str) -> None:
        """Delete backup `name`'s commit marker: from then on it is not committed."""
        self._remove_object(self.location.fs_path(name, MARKER))

    def _remove_object(self, path: str) -> None:
        try:
            self.fs.rm_file(path)
        except FileNotFoundError:
            pass

    def _state(self, name: str) -> str:
        """ "committed" (marker), "damaged" (set aside) or "partial" (neither)."""
        if self.fs.exists(self.location.fs_path(name, MARKER)):
            return "committed"
        if self.fs.exists(self.location.fs_path(name, DAMAGED)):
            return "damaged"
        return "partial"

    # ----------------------------------------------------------------- writer
    def prepare(self) -> None:
        """Prove `backup_dir` writable with a probe object. Primary process only.

        Raises:
            BackupDirNotWritableError: when the bucket cannot be reached or written.
        """
        probe = self.location.fs_path(f"{PROBE_PREFIX}{uuid.uuid4().hex}")
        try:
            self.fs.pipe_file(probe, b"ft")
            self.fs.rm_file(probe)
        except (OSError, ValueError) as e:
            raise errors.BackupDirNotWritableError(
                f"backup_dir {self.directory} is not writable ({type(e).__name__}: {e}). "
                "Backups could not be saved there: check that the bucket exists, and that "
                "the credentials found in the usual places (GOOGLE_APPLICATION_CREDENTIALS "
                "or the metadata server for gs://; AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                "~/.aws or the instance role for s3://, AWS_ENDPOINT_URL for another "
                "S3-compatible server) may write objects in it."
            ) from e

    def lock(self, timeout: float | None = None) -> None:
        """Hold the lease of `backup_dir` (`bucket_lease`). Primary process only.

        Waits at most `timeout` s (by default twice the lease's lifetime) for
        this process's deletion of an earlier fit's backups there to end
        (`background_removal`), then as long for a lease that looks live to expire
        or be renewed.

        Raises:
            BackupDirInUseError: when another live run holds it.
        """
        wait = 2 * bucket_lease.TTL_SECONDS if timeout is None else timeout
        if not background_removal.wait_for(self.directory, wait):
            raise errors.BackupDirInUseError(
                f"backup_dir {self.directory}: the backups of an earlier fit of this process "
                f"were still being deleted after {wait:.0f} s (the object store is slow or "
                "unreachable). Try again later, or give this run another backup_dir."
            )
        if self._lease is None:
            self._lease = bucket_lease.for_location(self.fs, self.location)
        self._lease.acquire(wait)

    def unlock(self) -> None:
        """Give up the lease. Primary process only."""
        if self._lease is not None:
            self._lease.release()
            self._lease = None

    def remove_partial(self) -> None:
        """Delete backups without a marker and probes. Primary process only, under the lease."""
        for name in self._names():
            if name.startswith(PROBE_PREFIX):
                self.fs.rm_file(self.location.fs_path(name))
            elif _COMMITTED.match(name) and self._state(name) == "partial":
                logger.info("removing %s: a save that did not commit", self._url(name))
                self._remove(name)

    def write(self, record: BackupRecord, arrays: Any) -> str:
        """Commit a backup of host `arrays` described by `record`. Primary process only.

        Returns:
            The backup's URL. When a backup of the same step is already
            committed it is kept as is (same step, same state).
        """
        name = self._start(record.step)
        if name is None:
            return self._url(self._step_name(record.step))
        bucket_arrays.write_metadata(self.location, name, arrays, self._ts_context())
        bucket_arrays.write_data(self.location, name, arrays, self._ts_context())
        self._commit(name, record, arrays)
        return self._url(name)

    def write_collective(
        self, record: BackupRecord, arrays: Any, coordinator: Any, timeout: float
    ) -> str:
        """Commit a backup that every process writes its own shards of. Call on all processes.

        The chief clears the backup's prefix and writes every array's metadata;
        then each process writes the chunks of the shards it holds; once all
        have, the chief checks the listing and commits.
        """
        name = self._step_name(record.step)
        decision = None
        if coordinator.is_chief:
            started = self._start(record.step)
            if started is not None:
                bucket_arrays.write_metadata(self.location, name, arrays, self._ts_context())
            decision = "write" if started is not None else "keep"
        decision = coordinator.broadcast("bucket-save", decision, timeout)
        if decision == "keep":
            return self._url(name)
        bucket_arrays.write_data(self.location, name, arrays, self._ts_context())
        coordinator.barrier("bucket-arrays-written", timeout)
        if coordinator.is_chief:
            self._commit(name, record, arrays)
        return self._url(name)

    def _step_name(self, step: int) -> str:
        return f"{PREFIX}{step:010d}"

    def _start(self, step: int) -> str | None:
        """The name to write step `step` to, cleared; None when it is committed."""
        name = self._step_name(step)
        if self._state(name) == "committed":
            try:
                self.verify(self._url(name))
                return None
            except errors.CheckpointCorruptedError as e:
                self.set_aside(self._url(name), e)
        self._remove(name)  # what an earlier attempt at this step left
        return name

    def _commit(self, name: str, record: BackupRecord, arrays: Any) -> None:
        """Check the listing, write the record, then the marker. Primary process only."""
        objects = self._objects(name)
        missing = sorted(bucket_arrays.expected_objects(arrays) - objects.keys())
        if missing:
            raise errors.CheckpointCorruptedError(
                f"The save of {self._url(name)} is incomplete: {len(missing)} array "
                f"object(s) were not found after every process wrote, first {missing[0]}. "
                "It was not committed; the previous backup stays the newest."
            )
        lease_check = self._lease.check if self._lease is not None else (lambda: None)
        bucket_record.write(self.fs, self.location, name, record, objects, lease_check)
        for older in self.committed()[self.max_to_keep :]:
            self._remove(self._name(older))

    def set_aside(self, path: str, reason: Exception) -> str:
        """Take the damaged backup at `path` out of the committed ones. Primary process only.

        Objects cannot be renamed: a `ft-damaged.json` naming the cause is
        written, then the marker deleted. The backup is never read again, is
        kept (for `python -m ft inspect`) until `delete` or a new save of its
        step, and does not count in `max_to_keep`.

        Returns:
            `path`.
        """
        name = self._name(path)
        body = json.dumps({"format": "ft-damaged", "version": 1, "cause": str(reason)})
        self.fs.pipe_file(self.location.fs_path(name, DAMAGED), body.encode())
        try:
            self.fs.rm_file(self.location.fs_path(name, MARKER))
        except FileNotFoundError:
            pass
        logger.warning(
            "Set the damaged backup %s aside (%s written, its commit marker deleted); "
            "it will not be loaded. Inspect it with `python -m ft inspect %s`. Cause: %s",
            path,
            DAMAGED,
            self.directory,
            reason,
        )
        return path

    def damaged(self) -> list[str]:
        """Backups set aside as damaged, highest step first. Call on any process."""
        found = []
        for name in self._names():
            match = _COMMITTED.match(name)
            if match and self._state(name) == "damaged":
                found.append((int(match.group(1)), self._url(name)))
        return [url for _, url in sorted(found, reverse=True)]

    def delete(self) -> None:
        """Remove every object ft wrote, never the user's own. Primary process only.

        This includes backups set aside as damaged: the run that owned them
        completed. Every commit marker is deleted before this returns, so
        nothing here counts as a backup any more; the objects, and after them
        the lease, are removed on a thread of its own (`background_removal`).
        """
        names = self._names()
        doomed = [name for name in names if _COMMITTED.match(name)]
        for name in doomed:
            self._remove_marker(name)
        for name in names:
            if name.startswith(PROBE_PREFIX):
                self.fs.rm_file(self.location.fs_path(name))
        lease, self._lease = self._lease, None
        held = lease.number if lease is not None else None
        leases = [n for n in names if n.startswith(LEASE_PREFIX)]

        def remove() -> None:
            try:
                for name in doomed:
                    self._remove(name)
            finally:
                if lease is not None:
                    lease.release()
                # Leftover leases of earlier runs, never one taken after ours.
                for name in leases:
                    number = name[len(LEASE_PREFIX) :]
                    if held is None or (number.isdigit() and int(number) <= held):
                        self._remove_object(self.location.fs_path(name))

        background_removal.start(self.directory, remove)

    # ----------------------------------------------------------------- readers
    def committed(self) -> list[str]:
        """Committed backups (with their marker), newest first. Call on any process."""
        found = []
        for name in self._names():
            match = _COMMITTED.match(name)
            if match and self.fs.exists(self.location.fs_path(name, MARKER)):
                found.append((int(match.group(1)), self._url(name)))
        return [url for _, url in sorted(found, reverse=True)]

    def latest(self, read_all: ReadAll = False) -> tuple[str, BackupRecord] | None:
        """The newest intact backup and its record, or None when there is none.

        Primary process only. Each backup is checked by `verify` (marker,
        record, listing, metadata CRC32s), or by `verify_all` (every array read
        too, each chunk's crc32c checked) when `read_all`. Damaged backups
        newer than the newest intact one are set aside (`set_aside`), so the
        next save of their step replaces them and they never push an intact
        backup out of the `max_to_keep` kept. When none is intact, nothing is
        set aside and the newest one's damage is raised.

        Raises:
            CheckpointCorruptedError: when backups exist but none is intact.
        """
        return newest_intact(self, read_all)

    def older_than(self, path: str) -> bool:
        """Whether a committed backup older than `path` exists. Call on any process."""
        return has_older(self, path)

    def read_record(self, path: str) -> BackupRecord:
        """The record of the backup at `path`, checked against its marker. Any process."""
        try:
            return bucket_record.read(self.fs, self.location, self._name(path))
        except bucket_record.Damage as e:
            raise self._corrupted(path, e.key, e.why) from e

    def verify(self, path: str) -> BackupRecord:
        """Check the backup at `path` up to its chunk bytes; return its record.

        Any process. Every recorded object must be listed with its recorded
        size, and the metadata objects must match their CRC32; the chunks'
        crc32c is checked by `read_arrays` as it reads them.

        Raises:
            CheckpointCorruptedError: naming the backup and the first missing,
                truncated or altered object.
        """
        record = self.read_record(path)
        name = self._name(path)
        try:
            bucket_record.check_listing(self.fs, self.location, name, record, self._objects(name))
        except bucket_record.Damage as e:
            raise self._corrupted(path, e.key, e.why) from e
        return record

    def verify_all(self, path: str) -> BackupRecord:
        """`verify`, then read every array as host NumPy (checking each chunk). Any process."""
        from ft import training_state

        record = self.verify(path)
        saved = training_state.manifest_from_json(record.variables)
        target = {
            group: [np.zeros(spec.shape, dtype=spec.dtype) for spec in specs]
            for group, specs in saved.items()
        }
        self.read_arrays(path, target)
        return record

    def read_arrays(self, path: str, target: Any) -> Any:
        """Load the arrays of the backup at `path` shaped like `target`. Any process.

        Raises:
            CheckpointCorruptedError: when a chunk fails its crc32c or is missing.
        """
        name = self._name(path)
        try:
            return bucket_arrays.read(self.location, name, target, self._ts_context())
        except ValueError as e:
            # TensorStore's status: a checksum mismatch is DATA_LOSS, a short
            # object OUT_OF_RANGE, a missing one NOT_FOUND, altered metadata
            # FAILED_PRECONDITION; anything else (UNAVAILABLE, ...) is no damage.
            if not str(e).startswith(_DAMAGE_STATUSES) and not str(e).startswith("array "):
                raise
            raise self._corrupted(
                path, bucket_arrays.ARRAYS, f"its arrays cannot be read ({e})"
            ) from e

    def leftovers(self) -> list[str]:
        """Names of uncommitted backups and probes: removed at the next start."""
        out = []
        for name in self._names():
            if name.startswith(PROBE_PREFIX) or (
                _COMMITTED.match(name) and self._state(name) == "partial"
            ):
                out.append(name)
        return out

    def live_run(self) -> str | None:
        """Who holds a live lease on `backup_dir`, or None. Reads only."""
        return Lease(self.fs, self.location).holder()

    def exists(self) -> bool:
        return bool(self._names())

    def _corrupted(self, path: str, key: str, why: str) -> errors.CheckpointCorruptedError:
        return errors.CheckpointCorruptedError(
            f"The backup {path} in backup_dir {self.directory} is damaged: object "
            f"{path}/{key}: {why}. It was not loaded. Delete {path} (every object under "
            "it) to resume from an older backup, or from scratch when there is none."
        )

    def close(self) -> None:
        self._context = None
