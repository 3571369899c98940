"""Where backups live: one interface (`base.BackupStore`), one implementation per storage kind.

`open_store(backup_dir)` picks the kind from the path: a local or network
filesystem path gets `posix.PosixStore` (commit by rename, `flock` lock); a
bucket URL (`gs://`, `s3://`) gets `bucket.BucketStore` (commit by a marker
object written last, a lease object instead of `flock`). Any other URL is
refused, rather than written to a local folder named after it.
"""

from __future__ import annotations

import os
import re

from ft import errors
from ft.store.base import BackupStore, RunLock
from ft.store.bucket_paths import SCHEMES as BUCKET_SCHEMES
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
        UnsupportedConfigurationError: for a URL whose scheme is neither `gs`
            nor `s3`, or a bucket URL whose path-layer package (gcsfs, s3fs)
            is not installed.
        ValueError: for a malformed `gs://` or `s3://` URL (no bucket).
    """
    scheme = url_scheme(backup_dir)
    if scheme in BUCKET_SCHEMES:
        from ft.store.bucket import BucketStore

        return BucketStore(os.fspath(backup_dir), max_to_keep=max_to_keep)
    if scheme is not None:
        raise errors.UnsupportedConfigurationError(
            f"backup_dir {os.fspath(backup_dir)!r} is a {scheme}:// URL; ft keeps backups "
            "on filesystem paths and in gs:// and s3:// buckets only. Use a local or "
            "network filesystem path (NFS, Lustre, a shared disk), gs://BUCKET/PREFIX or "
            "s3://BUCKET/PREFIX."
        )
    return PosixStore(backup_dir, max_to_keep=max_to_keep)
