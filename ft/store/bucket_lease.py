"""One live training run per bucket `backup_dir`: a lease object, since buckets have no flock.

Primary process only. A lease is an object `.ft-lease-NNNNNNNNNN` under
`backup_dir`, created with a create-if-absent write (S3 `If-None-Match: *`,
GCS `ifGenerationMatch=0`), so of two runs that race for the same number
exactly one gets it. The highest number is the current lease. Its holder
rewrites it every `ttl / 6` seconds with the time of renewal; a lease not
renewed for `ttl` seconds has expired (its holder crashed or was cut off).

A new run that finds:

- no lease: creates number 1;
- a lease of the same job (`FT_LAUNCH_ID`, set by `python -m ft.launch` and
  kept across its restarts): takes over at once by creating the next number;
- an expired lease: takes over the same way;
- a live lease: watches it; if it is renewed, another live run holds it and
  `BackupDirInUseError` is raised; if it expires first (a crashed run whose
  restart came quickly), takes over.

A holder that finds a higher number, or could not renew for `ttl` seconds,
has lost the lease and refuses to commit (`check`). Expiry is judged by the
wall clocks of the two machines (NTP-synchronized on any cloud VM).
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from typing import Any

from ft import errors
from ft.log import get_logger
from ft.store.bucket_paths import BucketURL

logger = get_logger()

PREFIX = ".ft-lease-"
_NAME = re.compile(r"^\.ft-lease-(\d{10})$")
TTL_SECONDS = 30.0
JOB_VARIABLE = "FT_LAUNCH_ID"

# backup_dir URL -> the lease this process holds there. Within one process the
# lease is re-entrant, like the flock of a local backup_dir: a `fit` that raised
# (and so never released it) can be called again, with a new callback too.
_held: dict[str, Lease] = {}
_held_lock = threading.Lock()


def for_location(fs: Any, location: BucketURL) -> Lease:
    """The lease this process holds on `location`, or a new one to acquire."""
    with _held_lock:
        return _held.get(location.url) or Lease(fs, location)


class Lease:
    """The lease of one bucket `backup_dir`.

    Args:
        fs: The fsspec filesystem of the bucket.
        location: The bucket `backup_dir`.
        ttl: Seconds a lease lives without renewal.
    """

    def __init__(self, fs: Any, location: BucketURL, ttl: float = TTL_SECONDS) -> None:
        self.fs = fs
        self.location = location
        self.ttl = float(ttl)
        self.token = uuid.uuid4().hex
        self.owner = f"pid {os.getpid()} on {socket.gethostname()}"
        self.job = os.environ.get(JOB_VARIABLE) or None
        self.number: int | None = None
        self._renewals = 0
        self._last_renewed = 0.0  # monotonic
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- listing
    def _numbers(self) -> list[int]:
        self.fs.invalidate_cache(self.location.fs_path())
        try:
            names = self.fs.ls(self.location.fs_path(), detail=False)
        except FileNotFoundError:
            return []
        found = [_NAME.match(os.path.basename(str(n).rstrip("/"))) for n in names]
        return sorted(int(m.group(1)) for m in found if m)

    def _path(self, number: int) -> str:
        return self.location.fs_path(f"{PREFIX}{number:010d}")

    def _read(self, number: int) -> dict[str, Any] | None:
        try:
            data = json.loads(self.fs.cat_file(self._path(number)))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treated as expired
        return data if isinstance(data, dict) else {}

    def _body(self) -> bytes:
        return json.dumps(
            {
                "owner": self.owner,
                "token": self.token,
                "job": self.job,
                "renewed_at": time.time(),
                "renewals": self._renewals,
                "ttl_s": self.ttl,
            }
        ).encode()

    # ------------------------------------------------------------ acquiring
    def acquire(self, timeout: float) -> None:
        """Hold the lease or raise `BackupDirInUseError`. Primary process only.

        Waits at most `ttl` (and never past `timeout`) for a live-looking
        lease to expire or be renewed.
        """
        if self.number is not None:
            return
        deadline = time.monotonic() + timeout
        watched: tuple[Any, ...] | None = None
        while True:
            numbers = self._numbers()
            current = numbers[-1] if numbers else 0
            held = self._read(current) if current else None
            if current and held is None:
                continue  # released between listing and reading
            if held is not None and not self._can_take_over(held):
                seen = (current, held.get("renewals"), held.get("token"))
                if watched is not None and watched != seen:
                    raise self._in_use(held, "it was renewed while this run waited")
                held_ttl = float(held.get("ttl_s", self.ttl))
                wait = held_ttl - (time.time() - float(held.get("renewed_at", 0)))
                if time.monotonic() + min(wait, 1.0) > deadline:
                    raise self._in_use(held, "it did not expire within the timeout")
                if watched is None:
                    logger.info(
                        "%s is leased by %s (renewed %.0f s ago): waiting up to %.0f s "
                        "for it to expire (a crashed run) or be renewed (a live run)",
                        self.location.url,
                        held.get("owner", "unknown"),
                        held_ttl - wait,
                        wait,
                    )
                watched = seen
                time.sleep(max(0.05, min(wait, 1.0)))
                continue
            if self._create(current + 1):
                break
            # Another run created that number first: look again.
        for older in numbers:
            self._delete(older)
        with _held_lock:
            _held[self.location.url] = self
        self._start_renewing()

    def _can_take_over(self, held: dict[str, Any]) -> bool:
        if self.job is not None and held.get("job") == self.job:
            return True  # the same job, restarted
        try:
            age = time.time() - float(held["renewed_at"])
            ttl = float(held.get("ttl_s", self.ttl))
        except (KeyError, TypeError, ValueError):
            return True  # not a lease ft can read: expired
        return age > ttl

    def _create(self, number: int) -> bool:
        try:
            self.fs.pipe_file(self._path(number), self._body(), mode="create")
        except FileExistsError:
            return False
        self.number = number
        self._last_renewed = time.monotonic()
        self._lost = None
        return True

    def _in_use(self, held: dict[str, Any], why: str) -> errors.BackupDirInUseError:
        return errors.BackupDirInUseError(
            f"backup_dir {self.location.url} is in use by another live training run "
            f"(lease {self.location.url}/{PREFIX}..., held by {held.get('owner', 'unknown')}; "
            f"{why}). Two runs on one backup_dir would overwrite each other's backups: "
            "give each run its own backup_dir, or stop the other run first (its lease "
            f"expires {held.get('ttl_s', self.ttl):.0f} s after it stops)."
        )

    # ------------------------------------------------------------- holding
    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name="ft-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 6):
            self.renew()

    def renew(self) -> None:
        """Rewrite the lease with a new renewal time, unless it was lost."""
        number = self.number
        if number is None or self._lost:
            return
        try:
            newer = [n for n in self._numbers() if n > number]
            if newer:
                self._lost = f"another run took it over as {PREFIX}{newer[-1]:010d}"
                logger.error("lost the lease of %s: %s", self.location.url, self._lost)
                return
            self._renewals += 1
            self.fs.pipe_file(self._path(number), self._body())
            self._last_renewed = time.monotonic()
        except Exception as e:  # any failure to renew (network, server) counts toward loss
            if time.monotonic() - self._last_renewed > self.ttl:
                self._lost = f"it could not be renewed for {self.ttl:.0f} s ({e})"
                logger.error("lost the lease of %s: %s", self.location.url, self._lost)

    def check(self) -> None:
        """Raise `BackupDirInUseError` unless this run still holds the lease.

        Called before every commit: a run that lost its lease writes nothing more.
        """
        if self.number is None:
            return
        if not self._lost:
            newer = [n for n in self._numbers() if n > self.number]
            if newer:
                self._lost = f"another run took it over as {PREFIX}{newer[-1]:010d}"
        if not self._lost and time.monotonic() - self._last_renewed > self.ttl:
            self._lost = f"it was last renewed {time.monotonic() - self._last_renewed:.0f} s ago"
        if self._lost:
            raise errors.BackupDirInUseError(
                f"This run lost its lease of backup_dir {self.location.url}: {self._lost}. "
                "Another run may be writing there now, so this one commits no more "
                "backups. Make sure only one run uses each backup_dir, and that the "
                "machine's clock is synchronized."
            )

    def release(self) -> None:
        """Stop renewing and delete the lease object. Primary process only."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.number is not None and not self._lost:
            self._delete(self.number)
        self.number = None
        with _held_lock:
            if _held.get(self.location.url) is self:
                del _held[self.location.url]

    def _delete(self, number: int) -> None:
        try:
            self.fs.rm_file(self._path(number))
        except FileNotFoundError:
            pass

    def holder(self) -> str | None:
        """Who holds a live lease, or None. Reads only: for `python -m ft inspect`."""
        numbers = self._numbers()
        if not numbers:
            return None
        held = self._read(numbers[-1])
        if held is None:
            return None
        try:
            age = time.time() - float(held["renewed_at"])
            ttl = float(held.get("ttl_s", self.ttl))
        except (KeyError, TypeError, ValueError):
            return None
        if age > ttl:
            return None
        return f"{held.get('owner', 'unknown')} (lease renewed {age:.0f} s ago)"
