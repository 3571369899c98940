"""A crc32c on every array chunk, computed by TensorStore as it encodes it.

For the arrays no single process holds whole, or that go to a bucket: the JAX
multi-host collective write, the bucket store (`bucket_arrays`), and a
process whose google-crc32c has no C extension. Backups the POSIX store's
`write` makes otherwise carry one crc32c per array in their record instead
(`array_checksums`); backups written with this codec before that still read
as they did, TensorStore checking it.

Orbax writes each array as a zarr3 array whose codec chain has no checksum on
the chunks (only the shard index has one). TensorStore's zarr3 driver has a
`crc32c` codec: appended to the chunk codecs, every chunk carries a CRC-32C
computed while it is encoded, and checked every time it is decoded (by the
`tensorstore` wheel's portable software crc32c, slower than the CPU's
instruction). A flipped byte or a truncated chunk then fails the read with
`DATA_LOSS`/`OUT_OF_RANGE` instead of loading wrong values, so the store needs
no checksum pass of its own over the array bytes, neither at commit nor at
restore. OCDBT's own nodes and manifests carry a crc32c already.

Orbax (0.12) has no option for it: this module wraps Orbax's
`tensorstore_utils.build_array_write_spec` and adds the codec for arrays
written under a directory ft registered (`checksummed`), leaving every other
Orbax user in the process alone. When the Orbax in use does not build specs
that way, `Tracker.applied` stays False and the store falls back to a CRC32 of
every file at commit, and says so once in the log.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from ft import log

CODEC = {"name": "crc32c"}

_lock = threading.Lock()
_active: dict[str, Tracker] = {}  # directory prefix -> its tracker
_installed: bool | None = None  # None: not tried yet


class Tracker:
    """Counts the arrays written under one directory, and those given the codec."""

    def __init__(self) -> None:
        self.seen = 0
        self.checksummed = 0

    @property
    def applied(self) -> bool:
        """True when at least one array was written and every one has the codec."""
        return self.seen > 0 and self.seen == self.checksummed


def _add_codec(spec: dict[str, Any]) -> bool:
    """Append crc32c to the chunk codecs of an Orbax zarr3 write spec, in place."""
    base = spec.get("base", spec) if spec.get("driver") == "cast" else spec
    if base.get("driver") != "zarr3":
        return False
    codecs = base.get("metadata", {}).get("codecs")
    if not (isinstance(codecs, list) and codecs):
        return False
    outer = codecs[0]
    if outer.get("name") == "sharding_indexed":
        codecs = outer.get("configuration", {}).get("codecs")
        if not isinstance(codecs, list):
            return False
    if CODEC not in codecs:
        codecs.append(dict(CODEC))
    return True


def _install() -> bool:
    global _installed
    if _installed is not None:
        return _installed
    _installed = False
    try:
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    except ImportError:
        return False
    original = getattr(ts_utils, "build_array_write_spec", None)
    if original is None:
        return False

    def build_array_write_spec(info: Any, *args: Any, **kwargs: Any) -> Any:
        write_spec = original(info, *args, **kwargs)
        parent = getattr(info, "parent_dir", None)
        tracker = _tracker_for(str(parent.as_posix()) if parent is not None else "")
        if tracker is not None:
            spec = write_spec.json
            with _lock:
                tracker.seen += 1
                if isinstance(spec, dict) and _add_codec(spec):
                    tracker.checksummed += 1
        return write_spec

    ts_utils.build_array_write_spec = build_array_write_spec
    _installed = True
    return True


def _tracker_for(directory: str) -> Tracker | None:
    with _lock:
        for prefix, tracker in _active.items():
            if directory == prefix or directory.startswith(prefix + "/"):
                return tracker
    return None


@contextlib.contextmanager
def checksummed(directory: str) -> Iterator[Tracker]:
    """Give every array Orbax writes under `directory`, in this block, a chunk crc32c."""
    tracker = Tracker()
    if _install():
        with _lock:
            _active[directory] = tracker
    try:
        yield tracker
    finally:
        with _lock:
            _active.pop(directory, None)
        if not tracker.applied and (tracker.seen or not _installed):
            import orbax.checkpoint as ocp

            log.say_once(
                "no-chunk-crc32c",
                logging.WARNING,
                "orbax-checkpoint %s writes arrays in a way ft cannot add a per-chunk "
                "crc32c to; every file is checksummed at commit instead (slower saves "
                "and restores, same guarantees).",
                getattr(ocp, "__version__", "?"),
            )
