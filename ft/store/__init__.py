"""Where backups live: one interface (`base.BackupStore`), one implementation per storage kind.

`open_store(backup_dir)` picks the kind from the path: a local or network
filesystem path gets `posix.PosixStore` (commit by rename, `flock` lock).
Bucket URLs (`gs://`, `s3://`) are refused with a clear error until the
bucket store (commit by a marker object written last, a lease object instead
of `flock`) exists, rather than writing a local folder named `s3:`.
"""

from __future__ import annotations

import os
import re

from ft import errors
from ft.store.base import BackupStore, RunLock
from ft.store.posix import PosixStore

__all__ = ["BackupStore", "PosixStore", "RunLock", "open_store", "url_scheme"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(backup_dir: str | os.PathLike[str]) -> str | None:
    """The URL scheme of `backup_dir` (`"gs"`, `"s3"`, ...), or None for a plain path."""
    match = _SCHEME.match(os.fspath(backup_dir))
    return match.group(1).lower() if match else None


def open_store(backup_dir: str | os.PathLike[str], max_to_keep: int = 1) -> BackupStore:
    """The store of `backup_dir`, by its kind. Call on any process.

    Raises:
        UnsupportedConfigurationError: for a URL (`gs://`, `s3://`, ...),
            which no store supports yet.
    """
    scheme = url_scheme(backup_dir)
    if scheme is not None:
        raise errors.UnsupportedConfigurationError(
            f"backup_dir {os.fspath(backup_dir)!r} is a {scheme}:// URL, and this ft keeps "
            "backups on filesystem paths only: object stores have no atomic rename and no "
            "flock, and their store (commit by a marker object, a lease instead of a lock) "
            "is not there yet. Use a local or network filesystem path (NFS, Lustre, a "
            "shared disk), or copy the backups to the bucket yourself."
        )
    return PosixStore(backup_dir, max_to_keep=max_to_keep)
