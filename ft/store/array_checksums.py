"""One crc32c per array, computed by the writing process and checked as each array is read.

For a backup whose arrays the writing process holds whole (the POSIX store's
`write`: host arrays of a snapshot), the store computes a CRC-32C of every
array's bytes (C order, native byte order) with google-crc32c's C library,
which uses the CPU's crc32c instruction (about 12 GB/s on one core, where the
`tensorstore` wheel's zarr3 `crc32c` codec is a portable software one that made
a read about 1.5 x slower). It runs on the save pipeline's thread before Orbax
writes the arrays without a chunk codec; the values go into the backup's
record (`BackupRecord.array_crc32c`, keyed by Orbax's array name). A restore
checks each array as soon as its read lands (`arrays.read`), while the others
are still being read, and `verify_all` checks every one. A mismatch raises a
ValueError with `DATA_LOSS` (TensorStore's word for a checksum mismatch) naming
the array, so the store's damage handling is the same as for a chunk codec
failure.

The GIL. google-crc32c's Python `extend` holds the GIL while it checksums a
numpy buffer, so a training thread that needs the GIL every few milliseconds
(a GPU step dispatched from Python) waits a whole switch interval per step
while the pass runs (`benchmarks/host_contention.py`: 111 steps/s against
36,000). ft therefore calls the same library's `crc32c_extend` through ctypes,
which releases the GIL for the call: the same values, the same speed, and the
training thread runs beside it. The function is found through the extension
module's own link to the library (a wheel detail, not an API): it is checked at
first use against the standard check value and against google-crc32c's
`value`, and when it is missing or disagrees ft says so once in the log and
uses `extend` in pieces, as before.

Backups written otherwise keep the chunk codec (`chunk_checksums`): the JAX
multi-host collective write (no process holds every array), the bucket store,
backups written before this existed, and a process whose google-crc32c has no
C extension (its pure-Python fallback would be far slower than the codec).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import log

# Bytes per call of google-crc32c's Python `extend`, when ft cannot call the C
# library itself. `extend` (1.9) releases the GIL only for `bytes` of 1 MB and
# more, not for a numpy buffer: each call holds the GIL for its whole piece,
# about 0.7 ms for 8 MB.
PIECE = 8 << 20

# CRC-32C of b"123456789", the standard check value (RFC 3720, B.4).
_CHECK_VALUE = 0xE3069283


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
    """The CRC-32C of `array`'s bytes in C order.

    Any thread; the array must not change meanwhile. The GIL is released while
    it runs when ft can call google-crc32c's C library itself (`gil_free`). A
    non-contiguous array is copied first (snapshots and read buffers are
    contiguous).
    """
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    extend = _gil_free_extend()
    if extend is not None:
        # `flat` holds the buffer alive for the call.
        return int(extend(0, flat.ctypes.data, flat.size))
    import google_crc32c

    # google-crc32c's C `extend` parses its buffer with "y#": read-only only.
    flat.flags.writeable = False
    crc = 0
    for start in range(0, flat.size, PIECE):
        crc = google_crc32c.extend(crc, flat[start : start + PIECE])
    return int(crc)


def gil_free() -> bool:
    """Whether `crc32c` releases the GIL while it runs here. Any thread."""
    return _gil_free_extend() is not None


@functools.cache
def _gil_free_extend() -> Callable[[int, int, int], int] | None:
    """google-crc32c's C `crc32c_extend(crc, data, size)` through ctypes, checked once;
    None when it cannot be called that way here (said once in the log)."""
    found, why = _find_c_extend()
    if found is None:
        log.say_once(
            "crc32c-holds-gil",
            logging.INFO,
            "ft cannot call google-crc32c's C library without the GIL here (%s): its "
            "checksums hold the GIL, so a training loop bound by its own Python runs "
            "slower while a backup is checksummed. Reinstall google-crc32c from its "
            "wheel (pip install --force-reinstall google-crc32c) to get the GIL-free path.",
            why,
        )
    return found


def _find_c_extend() -> tuple[Callable[[int, int, int], int] | None, str]:
    """The checked ctypes function and "", or None and why not."""
    if not _c_implementation():
        return None, "no C extension"
    try:
        from google_crc32c import _crc32c  # type: ignore[attr-defined]

        # dlsym on the extension's handle also searches the libraries it links.
        function = ctypes.CDLL(_crc32c.__file__).crc32c_extend
    except (ImportError, AttributeError, OSError) as error:
        return None, f"crc32c_extend not found: {error}"
    function.restype = ctypes.c_uint32
    function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    why = _disagreement(function)
    return (None, why) if why else (function, "")


def _disagreement(extend: Callable[[int, int, int], int]) -> str:
    """Empty when `extend(crc, address, size)` computes the CRC-32C of the standard
    check string and of a random buffer as google-crc32c's `value` does, else what
    it got wrong."""
    import google_crc32c

    check = np.frombuffer(b"123456789", np.uint8)
    if extend(0, check.ctypes.data, check.size) != _CHECK_VALUE:
        return "crc32c_extend does not give the standard check value"
    sample = np.random.default_rng(0).integers(0, 256, size=4099, dtype=np.uint8)
    got, want = extend(0, sample.ctypes.data, sample.size), google_crc32c.value(sample.tobytes())
    if got != want:
        return f"crc32c_extend gave {got:#010x} for 4099 bytes, google-crc32c {want:#010x}"
    return ""


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
