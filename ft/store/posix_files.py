"""Files of a backup on a POSIX filesystem: fsync, sizes and CRC32s, and checking them.

Every file is fsynced before a commit and its size recorded. A CRC32 (zlib,
which releases the GIL: files are summed in parallel) is recorded for every
file whose bytes no array checksum covers: all of them, unless the arrays
carry one, in which case OCDBT data files (`d/`) are left to the read and
marked with what covers them: `ARRAY_CRC32C` when the record holds a crc32c
of every array (`array_checksums`), `CHUNK_CRC32C` when every chunk carries
TensorStore's crc32c codec (`chunk_checksums`).
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

_CHUNK = 8 << 20
# The marks on an OCDBT data file in the record's `files`, for what checks its bytes.
ARRAY_CRC32C = "array_crc32c"  # the record's crc32c of every array
CHUNK_CRC32C = "chunk_crc32c"  # TensorStore's crc32c codec on every chunk
_IO_THREADS = 4
# The directory of OCDBT data files, whose bytes an array checksum covers.
_OCDBT_DATA = "d"


def _crc32(path: str, sync: bool = False) -> tuple[int, int]:
    """CRC32 and size of a file, fsyncing it on the way when `sync`."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return crc, size


def _sync_and_sum(path: str, mark: str | None) -> dict[str, int]:
    """fsync a file; its size, and its CRC32 unless `mark` names what covers its bytes."""
    if mark is None:
        value, size = _crc32(path, sync=True)
        return {"size": size, "crc32": value}
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        return {"size": os.fstat(fd).st_size, mark: 1}
    finally:
        os.close(fd)


def fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_and_sum(tmp: str, data_mark: str | None) -> dict[str, dict[str, int]]:
    """fsync every file and directory under `tmp`; the record's `files` entry for each.

    Primary process only. OCDBT data files get `data_mark` (`ARRAY_CRC32C`
    or `CHUNK_CRC32C`) instead of a CRC32 when it is given.
    """
    files, dirs = [], []
    for root, dir_names, file_names in os.walk(tmp):
        files += [os.path.join(root, name) for name in file_names]
        dirs += [os.path.join(root, name) for name in dir_names]
    marks = [
        data_mark if os.path.basename(os.path.dirname(path)) == _OCDBT_DATA else None
        for path in files
    ]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        sums = list(pool.map(_sync_and_sum, files, marks))
    for path in dirs:
        fsync_path(path, directory=True)
    return {os.path.relpath(path, tmp): meta for path, meta in zip(files, sums, strict=True)}


def check(
    path: str, files: dict[str, dict[str, int]], array_crcs: bool = False
) -> tuple[str, str] | None:
    """The first file under `path` that does not match `files`, and why; None if all do.

    Any process. A file marked `ARRAY_CRC32C` counts as checked only when
    `array_crcs` (the record holds the array crc32cs).
    """
    marks = (CHUNK_CRC32C, ARRAY_CRC32C) if array_crcs else (CHUNK_CRC32C,)
    expected = sorted(files.items())
    for relative, meta in expected:
        file_path = os.path.join(path, relative)
        if not os.path.isfile(file_path):
            return file_path, "the file is missing"
        size = os.path.getsize(file_path)
        if size != meta.get("size"):
            return file_path, f"it has {size} bytes, {meta.get('size')} were written"
        if "crc32" not in meta and not any(meta.get(mark) for mark in marks):
            return file_path, "its record holds no checksum for it"
    summed = [(relative, meta) for relative, meta in expected if "crc32" in meta]
    paths = [os.path.join(path, relative) for relative, _ in summed]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        sums = list(pool.map(_crc32, paths))
    for (relative, meta), (crc, _) in zip(summed, sums, strict=True):
        if crc != meta["crc32"]:
            return os.path.join(path, relative), "its checksum does not match"
    return None
