"""The record and commit marker of a bucket backup: written last, checked first.

A backup in a bucket is committed by its marker object (`ft-commit.json`),
which holds the size and CRC32 of the record (`ft-backup.json`); the record
holds every object's size, and a CRC32 of each small metadata object (the
chunks carry their own crc32c, checked by TensorStore as they are read).
`bucket.BucketStore` calls these with its filesystem and location; the damage
they find is raised as `Damage` and reported by the store.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from typing import Any

from ft.metadata import FILENAME as RECORD_NAME
from ft.metadata import BackupRecord
from ft.store.bucket_paths import BucketURL

MARKER = "ft-commit.json"
_FORMAT = "ft-commit"


class Damage(Exception):
    """Object `key` of a backup is missing, truncated or altered (`why`)."""

    def __init__(self, key: str, why: str) -> None:
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def crc32s(fs: Any, location: BucketURL, name: str, keys: list[str]) -> dict[str, int]:
    """CRC32 of the objects `keys` of backup `name`, fetched concurrently."""
    if not keys:
        return {}
    paths = {location.fs_path(name, key): key for key in keys}
    data = fs.cat(list(paths), on_error="raise")
    return {paths[path]: zlib.crc32(body) for path, body in data.items()}


def write(
    fs: Any,
    location: BucketURL,
    name: str,
    record: BackupRecord,
    objects: dict[str, int],
    before_marker: Callable[[], None],
) -> None:
    """Write the record of backup `name` (listing `objects`), then its marker.

    Primary process only. `before_marker` runs between the two (the lease check):
    an exception there leaves the backup uncommitted.
    """
    small = [key for key in objects if key.endswith("zarr.json")]
    sums = crc32s(fs, location, name, small)
    record.files = {
        key: {"size": size, "crc32": sums[key]}
        if key in sums
        else {"size": size, "chunk_crc32c": 1}  # checked by TensorStore as it reads
        for key, size in sorted(objects.items())
        if key not in (RECORD_NAME, MARKER)
    }
    body = record.to_json().encode()
    fs.pipe_file(location.fs_path(name, RECORD_NAME), body)
    before_marker()
    checksum = {"size": len(body), "crc32": zlib.crc32(body)}
    marker = {"format": _FORMAT, "version": 1, "record": checksum}
    fs.pipe_file(location.fs_path(name, MARKER), json.dumps(marker).encode())


def read(fs: Any, location: BucketURL, name: str) -> BackupRecord:
    """The record of backup `name`, checked against its marker. Any process.

    A missing or unparsable object is damage; any other error (the network,
    credentials) is raised as it is, and never takes a backup out of use.

    Raises:
        Damage: the marker or the record is missing, altered or unreadable.
    """
    try:
        expected = json.loads(fs.cat_file(location.fs_path(name, MARKER)))["record"]
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise Damage(MARKER, f"its commit marker cannot be read ({e})") from e
    try:
        body = fs.cat_file(location.fs_path(name, RECORD_NAME))
    except FileNotFoundError as e:
        raise Damage(RECORD_NAME, f"its record cannot be read ({e})") from e
    if len(body) != expected.get("size") or zlib.crc32(body) != expected.get("crc32"):
        raise Damage(RECORD_NAME, "its size or checksum does not match the commit marker")
    try:
        return BackupRecord.from_json(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise Damage(RECORD_NAME, f"its record cannot be read ({e})") from e


def check_listing(
    fs: Any, location: BucketURL, name: str, record: BackupRecord, objects: dict[str, int]
) -> None:
    """Check the listed `objects` of backup `name` against its `record`. Any process.

    Every recorded object must be listed with its recorded size, and the
    metadata objects must match their CRC32.

    Raises:
        Damage: naming the first missing, truncated or altered object.
    """
    for key, meta in sorted(record.files.items()):
        if key not in objects:
            raise Damage(key, "the object is missing")
        if objects[key] != meta.get("size"):
            raise Damage(key, f"it has {objects[key]} bytes, {meta.get('size')} were written")
        if "crc32" not in meta and not meta.get("chunk_crc32c"):
            raise Damage(key, "its record holds no checksum for it")
    summed = [key for key, meta in sorted(record.files.items()) if "crc32" in meta]
    sums = crc32s(fs, location, name, summed)
    for key in summed:
        if sums[key] != record.files[key]["crc32"]:
            raise Damage(key, "its checksum does not match")
