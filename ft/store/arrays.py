"""The arrays of a backup, through Orbax and TensorStore, for every kind of store.

Orbax writes and reads the arrays (a zarr3 array per variable in an OCDBT
database); TensorStore's drivers reach local paths and buckets alike, so a
store passes only a path. Nothing here knows how a backup is committed. The
arrays' bytes are checked one of two ways: by one crc32c per array that the
writing process computed and the caller passes to `read` and `read_every`
(`array_checksums`), or by a crc32c on every chunk that TensorStore computes
as it encodes it and checks as it decodes it (`chunk_checksums`).

Three choices bring this path closer to what the bytes cost (measured on 2
cores, 0.26 GB of state; `docs/benchmark.md`):

- Writes copy nothing: Orbax's numpy handler copies every host array before
  writing it (`deepcopy_host_arrays`), a guard against the caller changing
  them during an asynchronous save. ft hands Orbax a private snapshot that
  nothing changes until the synchronous save returns, so it is written in place
  (orbax-checkpoint before 0.12.5 always copies; ft then says so once in the log).
- Writes leave cores to training: TensorStore encodes (copies, and
  checksums with the chunk codec) chunks on `encoding_threads()` threads,
  half the cores, instead of one per core. With training on both cores,
  the write then took a third less time, and training slowed no more than
  beside a raw write of the same bytes.
- Reads: when this process holds every array whole (host arrays, or JAX
  arrays on devices it addresses), `read` reads each array into a 64-byte
  aligned host buffer that JAX on the CPU takes without another copy, or,
  under TensorFlow, into the memory of a tensor that `assign` takes without
  a copy (`ft.host_buffers`). With a recorded crc32c per array it reads the
  bytes from Orbax's files straight into those buffers (`direct_read`; a
  cold restore went from 1.2-1.7 x a cold read of the files to 0.95-1.5 x);
  otherwise, or where the files are not laid out as `direct_read` expects,
  it opens the zarr3 arrays with TensorStore directly, all at once, and
  decodes each into its buffer (TensorStore checks every chunk's crc32c as
  it decodes it, where the backup has them). Each array's crc32c is checked
  as soon as its read lands, while the others are still read.
  This skips Orbax's restore machinery, its import and its extra copy.
  JAX arrays sharded across processes are read by Orbax, which reads each
  process's shards onto their live shardings.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import host_buffers, log
from ft.log import get_logger
from ft.store import array_checksums, chunk_checksums, direct_read

logger = get_logger()

# Bytes `read_every` holds at once: it reads to check, and keeps nothing.
_READ_WINDOW = 256 << 20


def new_handler() -> Any:
    """Orbax's uncompressed pytree handler for ft's array trees, with ft's handler for
    snapshot arrays. `read` restores through it directly (`new_checkpointer` wraps it
    for writes)."""
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        *[
            (ty, _snapshot_handler() if ty is np.ndarray else handlers.get_type_handler(ty))
            for ty in handlers.supported_types()
        ]
    )
    # Uncompressed: model state barely compresses, and zstd doubled the
    # write time of a 1 GB state on 2 cores (benchmarks/checkpoint_overhead.py).
    return ocp.PyTreeCheckpointHandler(
        use_compression=False, use_zarr3=True, type_handler_registry=registry
    )


def new_checkpointer(barrier_prefix: str | None = None) -> Any:
    """A synchronous Orbax checkpointer for writing ft's array trees (`new_handler`).

    With `barrier_prefix` (a name unique to one backup, the same on every
    process), for a write that every process of a JAX multi-host run makes of
    its own shards: Orbax then syncs the processes through the `jax.distributed`
    client's barriers, named with the prefix, instead of a collective across
    all devices, so the write can run on the save pipeline's thread while
    training steps run theirs (Orbax's own asynchronous checkpointer does the
    same).
    """
    import orbax.checkpoint as ocp

    # Synchronous Orbax: ft already runs it off the training thread on a
    # private snapshot, and Orbax's async path would copy the state again.
    if barrier_prefix is None:
        return ocp.Checkpointer(new_handler())
    import jax

    options = ocp.options.MultiprocessingOptions(
        active_processes=set(range(jax.process_count())), barrier_sync_key_prefix=barrier_prefix
    )
    return ocp.Checkpointer(new_handler(), multiprocessing_options=options)


def _cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def encoding_threads() -> int:
    """TensorStore threads that encode a save's chunks: half the cores this process may use."""
    return max(1, _cores() // 2)


def reading_threads() -> int:
    """Threads that read a restore's arrays (`direct_read`): one per core, 2 to 8."""
    return max(2, min(8, _cores()))


def _snapshot_handler() -> Any:
    """Orbax's numpy handler for ft's snapshots: no copy, fewer encoding threads."""
    import orbax.checkpoint as ocp

    # ft's snapshot is private and unchanged until save() returns: no copy of it.
    # orbax-checkpoint before 0.12.5 has no such choice and copies every array.
    init = ocp.type_handlers.NumpyHandler.__init__
    no_copy = "deepcopy_host_arrays" in inspect.signature(init).parameters
    if not no_copy:
        log.say_once(
            "orbax-copies",
            logging.INFO,
            "orbax-checkpoint %s copies every array before writing it (it has no "
            "`deepcopy_host_arrays` before 0.12.5): each save here holds one more copy of "
            "the state in host memory and takes longer. `pip install -U orbax-checkpoint` "
            "to save without it.",
            ocp.__version__,
        )

    class SnapshotHandler(ocp.type_handlers.NumpyHandler):  # type: ignore[misc]
        def __init__(self) -> None:
            if no_copy:
                super().__init__(deepcopy_host_arrays=False)
            else:
                super().__init__()

        async def serialize(self, values: Any, infos: Any, args: Any = None) -> Any:
            # The save runs beside training: its chunks are encoded (copied, and
            # checksummed with the codec) by at most `encoding_threads()`
            # threads, not one per core.
            # Orbax's context for this save (its caches, I/O limits), plus that limit.
            if infos and infos[0].ts_context is not None:
                import tensorstore as ts

                spec = infos[0].ts_context.spec.to_json()
                spec["data_copy_concurrency"] = {"limit": encoding_threads()}
                context = ts.Context(spec)
                infos = [info.replace(ts_context=context) for info in infos]
            return await super().serialize(values, infos, args)

    return SnapshotHandler()


def write(
    checkpointer: Any, directory: str, arrays: Any, owner: str, chunk_crc: bool = True
) -> bool:
    """Write `arrays` to `directory`; True when every chunk got a crc32c.

    `owner` is the directory ft registered for the codec (Orbax writes under a
    temporary name of its own inside it, then renames). Without `chunk_crc`
    the chunks get no codec: the caller checksums the arrays itself
    (`array_checksums`). Nothing may change `arrays` until this returns (the
    checkpointer does not copy them).
    """
    import orbax.checkpoint as ocp

    if not chunk_crc:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(arrays))
        return False
    with chunk_checksums.checksummed(owner) as tracker:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(arrays))
    return tracker.applied


def read(
    handler: Callable[[], Any],
    directory: str,
    target: dict[str, list[Any]],
    crcs: dict[str, int] | None = None,
) -> dict[str, list[Any]]:
    """Read the arrays in the local `directory` shaped like `target`, checksums checked.

    Any process. Directly through TensorStore when this process holds every
    array whole, through Orbax otherwise (JAX arrays sharded across
    processes). `crcs` are the backup's recorded array crc32cs (Orbax name ->
    crc32c), each checked on the host values once its array is read; without
    them, TensorStore checks the chunk codec. `handler` returns the
    store's Orbax handler (`new_handler`); it is called only when Orbax reads,
    so a direct read never imports Orbax. Orbax's `Checkpointer.restore` ends
    in a barrier across all devices under JAX multi-host, which a process
    whose read failed never reaches: ft restores through the handler, and the
    processes then agree on their reads themselves (`ft.restore`).

    Raises:
        ValueError or OSError: as TensorStore reports damage (`DATA_LOSS` for
            a checksum mismatch, `OUT_OF_RANGE` for a short file, `NOT_FOUND`
            for a missing array), `DATA_LOSS` for an array that does not
            match its recorded crc32c, or an array whose stored shape or
            dtype is not the target's.
    """
    if all(_held_whole(value) for values in target.values() for value in values):
        out = _read_whole(directory, target, crcs)
        if out is not None:
            return out
    import orbax.checkpoint as ocp
    from etils import epath

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    restored: dict[str, list[Any]] = handler().restore(
        epath.Path(directory), args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
    )
    if crcs:
        _check_restored(restored, ocp.tree.get_param_names(restored), crcs)
    return restored


def storage_error(error: BaseException) -> BaseException | None:
    """The OSError or ValueError (TensorStore's, or a crc32c mismatch) that `error` is
    or was raised from, or None. Orbax raises a bare `Exception` from TensorStore's
    error when a sharded read fails."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError | ValueError):
            return seen
        seen = seen.__cause__
    return None


def _check_restored(
    restored: dict[str, list[Any]], names: dict[str, list[str]], crcs: dict[str, int]
) -> None:
    """Check the recorded crc32cs of what Orbax restored (`names`: Orbax's), on the host values.

    An array sharded across processes cannot be summed whole here; a backup
    with array crc32cs restored that way was read whole by the chief's
    `verify_all` first (`ft.restore`).
    """
    for group, values in restored.items():
        if not values:
            continue  # Orbax names an empty group as a leaf
        for name, value in zip(names[group], values, strict=True):
            if _held_whole(value):
                array_checksums.check(name, np.asarray(value), crcs)


def orbax_name(group: str, index: int) -> str:
    """Orbax's name for the array at `target[group][index]` (`ocp.tree.get_param_names`)."""
    return f"{group}.{index}"


def _held_whole(value: Any) -> bool:
    sharding = getattr(value, "sharding", None)
    return sharding is None or bool(getattr(sharding, "is_fully_addressable", False))


def _read_whole(
    directory: str, target: dict[str, list[Any]], crcs: dict[str, int] | None
) -> dict[str, list[Any]] | None:
    """Every array of the OCDBT checkpoint in `directory`, read at once, checked as it lands.

    Straight into the destinations with `direct_read` when the backup
    records every array's crc32c and is laid out as it expects, else through
    TensorStore, every array opened at once. Each array's recorded crc32c
    (when `crcs`) is checked as soon as its read lands, while the next ones
    are still read. None when an array is not where Orbax names it (another
    Orbax's layout, or damage): Orbax then reads, or reports the damage.
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

    names = [orbax_name(group, index) for group, index, _ in items]
    fallback: direct_read.Fallback | None = None
    if crcs:
        requests = list(zip(names, buffers, strict=True))
        fallback = direct_read.read(directory, requests, crcs, landed, reading_threads())
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

    Any process. Several arrays at a time (up to `_READ_WINDOW` bytes in
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
        while pending and in_flight + nbytes > _READ_WINDOW:
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
