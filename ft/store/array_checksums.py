"""One crc32c per array, computed by the writing process and checked as each array is read.

For a backup whose arrays the writing process holds whole (the POSIX store's
`write`: host arrays of a snapshot), the store computes a CRC-32C of every
array's bytes (C order, native byte order) with google-crc32c's C
implementation, which uses the CPU's crc32c instruction (about 12 GB/s on one
core, where the `tensorstore` wheel's zarr3 `crc32c` codec is a portable
software one that made a read about 1.5 x slower). It runs on the save
pipeline's thread, in pieces, before Orbax writes the arrays without a chunk
codec; the values go into the backup's record (`BackupRecord.array_crc32c`,
keyed by Orbax's array name). A restore checks each array as soon as its read
lands (`arrays.read`), while the others are still being read, and
`verify_all` checks every one. A mismatch raises a ValueError with `DATA_LOSS`
(TensorStore's word for a checksum mismatch) naming the array, so the store's
damage handling is the same as for a chunk codec failure.

Backups written otherwise keep the chunk codec (`chunk_checksums`): the JAX
multi-host collective write (no process holds every array), the bucket store,
backups written before this existed, and a process whose google-crc32c has no
C extension (its pure-Python fallback would be far slower than the codec).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ft import log

# Bytes per `extend` call. google-crc32c (1.9) releases the GIL only for `bytes`
# of 1 MB and more, not for a numpy buffer: each call holds the GIL for its whole
# piece, about 0.7 ms for 8 MB, so the training thread is never held for long.
PIECE = 8 << 20


def usable(arrays: dict[str, list[Any]]) -> bool:
    """Whether a backup of `arrays` gets array crc32cs: all host numpy arrays, and the C
    implementation loaded. Save pipeline's thread of the writing process."""
    if not all(isinstance(a, np.ndarray) for values in arrays.values() for a in values):
        return False
    return _c_implementation()


def _c_implementation() -> bool:
    """Whether google-crc32c runs its C extension; says once in the log when it does not."""
    try:
        import google_crc32c

        implementation = google_crc32c.implementation
    except ImportError:
        implementation = "missing"
    if implementation == "c":
        return True
    log.say_once(
        "no-c-crc32c",
        logging.INFO,
        "google-crc32c's C extension is not available here (implementation=%r): its "
        "pure-Python crc32c is far too slow for every array byte, so this process "
        "writes backups with TensorStore's per-chunk crc32c codec instead (slower "
        "saves and restores, same guarantees).",
        implementation,
    )
    return False


def crc32c(array: np.ndarray) -> int:
    """The CRC-32C of `array`'s bytes in C order, summed `PIECE` bytes at a time.

    Any thread; the array must not change meanwhile. A non-contiguous array
    is copied first (snapshots and read buffers are contiguous).
    """
    import google_crc32c

    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    # google-crc32c's C `extend` parses its buffer with "y#": read-only only.
    flat.flags.writeable = False
    crc = 0
    for start in range(0, flat.size, PIECE):
        crc = google_crc32c.extend(crc, flat[start : start + PIECE])
    return int(crc)


def of_arrays(arrays: dict[str, list[np.ndarray]]) -> dict[str, int]:
    """Orbax's array name -> crc32c of every array of a backup. Save pipeline's thread."""
    from ft.store.arrays import orbax_name

    return {
        orbax_name(group, index): crc32c(value)
        for group, values in arrays.items()
        for index, value in enumerate(values)
    }


def check(name: str, array: Any, crcs: dict[str, int]) -> None:
    """Raise a `DATA_LOSS` ValueError unless the host `array` named `name` has its
    recorded crc32c. Any process, as each array's read lands."""
    if name not in crcs:
        raise ValueError(
            f"DATA_LOSS: array {name!r} has no crc32c in the backup's record, which holds "
            f"crc32cs for {len(crcs)} other arrays"
        )
    got = crc32c(np.asarray(array))
    if got != crcs[name]:
        raise ValueError(
            f"DATA_LOSS: array {name!r} read with crc32c {got:#010x}, "
            f"{crcs[name]:#010x} was recorded when it was written"
        )


def check_names(stored: list[str], crcs: dict[str, int]) -> None:
    """Raise a `DATA_LOSS` ValueError unless the arrays `stored` are exactly those
    with a recorded crc32c. Any process."""
    missing = sorted(set(crcs) - set(stored))
    unrecorded = sorted(set(stored) - set(crcs))
    if missing or unrecorded:
        raise ValueError(
            f"DATA_LOSS: the arrays stored ({len(stored)}) are not those with a recorded "
            f"crc32c ({len(crcs)}): missing {missing[:5]}, without a crc32c {unrecorded[:5]}"
        )
