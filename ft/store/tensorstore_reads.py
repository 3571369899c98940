"""Reading a backup's arrays without Orbax: into a restore's buffers, or only to check them.

Any process, for arrays this process holds whole (host arrays, or JAX arrays
on devices it addresses); `ft.store.arrays.read` picks this path, and Orbax
for JAX arrays sharded across processes.

- `read` reads each array into a 64-byte aligned host buffer that JAX on the
  CPU takes without another copy, or, under TensorFlow, into the memory of a
  tensor that `assign` takes without a copy (`ft.host_buffers`). With a
  recorded crc32c per array it reads the bytes from Orbax's files straight
  into those buffers (`direct_read`; a cold restore went from 1.2-1.7 x a
  cold read of the files to 0.95-1.5 x); otherwise, or where the files are
  not laid out as `direct_read` expects, it opens the zarr3 arrays with
  TensorStore directly, all at once, and decodes each into its buffer
  (TensorStore checks every chunk's crc32c as it decodes it, where the
  backup has them). Each array's crc32c is checked as soon as its read
  lands, while the others are still read. This skips Orbax's restore
  machinery, its import and its extra copy.
- `read_every` reads every array of a backup to check it and keeps nothing
  (`verify_all`), with no Orbax call, so no collective under JAX multi-host.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import host_buffers
from ft.log import get_logger
from ft.store import array_checksums, direct_read

logger = get_logger()

# Bytes `read_every` holds at once: it reads to check, and keeps nothing.
READ_WINDOW = 256 << 20


def read(
    directory: str,
    target: dict[str, list[Any]],
    names: list[str],
    crcs: dict[str, int] | None,
    threads: int,
) -> dict[str, list[Any]] | None:
    """Every array of the OCDBT checkpoint in `directory`, read at once, checked as it lands.

    Straight into the destinations with `direct_read` when the backup
    records every array's crc32c and is laid out as it expects, else through
    TensorStore, every array opened at once. Each array's recorded crc32c
    (when `crcs`) is checked as soon as its read lands, while the next ones
    are still read. `names`: each array's Orbax name, in `target`'s order;
    `threads`: how many read at once (`direct_read`). None when an array is
    not where Orbax names it (another Orbax's layout, or damage): Orbax then
    reads, or reports the damage.
    """
    items = [(group, index, want) for group in target for index, want in enumerate(target[group])]
    allocate = host_buffers.for_backend()
    buffers, values = [], []
    for _, _, want in items:
        shape = tuple(int(d) for d in want.shape)
        dtype = np.dtype(want.dtype)
        # Read straight into an aligned buffer, or the memory of the engine's
        # own tensor (`host_buffers`).
        if getattr(want, "sharding", None) is not None:
            buffer, value = host_buffers.aligned(shape, dtype)
        else:
            buffer, value = allocate(shape, dtype)
        buffers.append(buffer)
        values.append(value)
    out: dict[str, list[Any]] = {group: [] for group in target}

    def landed(i: int) -> None:
        group, _, want = items[i]
        sharding = getattr(want, "sharding", None)
        if sharding is not None:
            import jax

            # Dispatched as each read lands, so transfers to an accelerator
            # overlap the reads still running; on the CPU it takes the buffer as is.
            out[group].append(jax.device_put(buffers[i], sharding))
        else:
            out[group].append(values[i])

    fallback: direct_read.Fallback | None = None
    if crcs:
        requests = list(zip(names, buffers, strict=True))
        fallback = direct_read.read(directory, requests, crcs, landed, threads)
        if fallback is None:
            return out
        logger.debug("reading %s through TensorStore: %s", directory, fallback.reason)
        for group in out.values():
            group.clear()
    if not _read_with_tensorstore(directory, items, names, buffers, crcs, landed):
        return None
    if fallback is not None and fallback.mismatch:
        # TensorStore read what the direct read found wrong: the layout it
        # relies on changed in a way its checks did not catch.
        from importlib import metadata

        logger.warning(
            "ft's direct reader disagreed with TensorStore %s on %s (%s); the arrays were "
            "read through TensorStore and are intact. Please report this to ft.",
            metadata.version("tensorstore"),
            directory,
            fallback.reason,
        )
    return out


def _read_with_tensorstore(
    directory: str,
    items: list[tuple[str, int, Any]],
    names: list[str],
    buffers: list[np.ndarray],
    crcs: dict[str, int] | None,
    landed: Callable[[int], None],
) -> bool:
    """Read every array into `buffers` through TensorStore; False when one is not found."""
    import tensorstore as ts

    context, base = _ocdbt({"driver": "file", "path": directory.rstrip("/") + "/"})
    opens = [
        ts.open(
            {"driver": "zarr3", "kvstore": {**base, "path": name + "/"}},
            open=True,
            context=context,
        )
        for name in names
    ]
    copies = []
    for (_, _, want), name, buffer, opened in zip(items, names, buffers, opens, strict=True):
        try:
            stored = opened.result()
        except ValueError as e:
            if "NOT_FOUND" in str(e):
                return False
            raise type(e)(f"array {name!r}: {e}") from e
        shape = tuple(int(d) for d in want.shape)
        dtype = np.dtype(want.dtype)
        if tuple(stored.shape) != shape or np.dtype(stored.dtype.numpy_dtype) != dtype:
            raise ValueError(
                f"array {name!r} is stored with shape {tuple(stored.shape)} and dtype "
                f"{stored.dtype.numpy_dtype}, expected {shape} and {dtype}"
            )
        # A chunk crc32c, where the backup has them, is checked as it decodes.
        copies.append(ts.array(buffer, copy=False, write=True).write(stored))
    for i, (name, copy, buffer) in enumerate(zip(names, copies, buffers, strict=True)):
        _opened(name, copy)
        if crcs:
            array_checksums.check(name, buffer, crcs)
        landed(i)
    return True


def _ocdbt(kvstore: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A context and the spec of the OCDBT database at `kvstore`, read with
    Orbax's cache for its B-tree nodes, shared by every array opened in it."""
    import tensorstore as ts

    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
    return context, {"driver": "ocdbt", "base": kvstore, "cache_pool": "cache_pool#ocdbt"}


def _opened(name: str, future: Any) -> Any:
    try:
        return future.result()
    except (OSError, ValueError) as e:
        raise type(e)(f"array {name!r}: {e}") from e


def read_every(kvstore: dict[str, Any], crcs: dict[str, int] | None = None) -> None:
    """Read every array of the OCDBT database at `kvstore` (a TensorStore kvstore spec).

    Any process. Several arrays at a time (up to `READ_WINDOW` bytes in
    flight, their chunks in parallel), each OCDBT node's checksum checked,
    and each array's recorded crc32c when `crcs` (the arrays stored must be
    exactly those recorded), else each chunk's crc32c; no Orbax call, so no
    collective under JAX multi-host: one process can run it alone.

    Raises:
        ValueError or OSError: naming the array that failed, from TensorStore,
            or `DATA_LOSS` for an array that does not match its crc32c.
    """
    import tensorstore as ts

    context, spec = _ocdbt(kvstore)
    keys = ts.KvStore.open(spec, context=context).result().list().result()
    names = sorted({k.decode()[: -len("/zarr.json")] for k in keys if k.endswith(b"zarr.json")})
    if crcs:
        array_checksums.check_names(names, crcs)
    opens = [
        ts.open(
            {"driver": "zarr3", "kvstore": {**spec, "path": name + "/"}}, open=True, context=context
        )
        for name in names
    ]
    pending: collections.deque[tuple[str, Any, int]] = collections.deque()
    in_flight = 0
    for name, opened in zip(names, opens, strict=True):
        array = _opened(name, opened)
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * array.dtype.numpy_dtype.itemsize
        while pending and in_flight + nbytes > READ_WINDOW:
            done, read, size = pending.popleft()
            _landed(done, read, crcs)
            in_flight -= size
        pending.append((name, array.read(), nbytes))
        in_flight += nbytes
    for done, read, _ in pending:
        _landed(done, read, crcs)


def _landed(name: str, read: Any, crcs: dict[str, int] | None) -> None:
    """Wait for one array's read; check its recorded crc32c when `crcs`."""
    value = _opened(name, read)
    if crcs:
        array_checksums.check(name, value, crcs)
