"""The arrays of a backup, through Orbax and TensorStore, for every kind of store.

Orbax writes and reads the arrays (a zarr3 array per variable in an OCDBT
database); TensorStore's drivers reach local paths and buckets alike, so a
store passes only a path. Nothing here knows how a backup is committed. The
arrays' bytes are checked one of two ways: by one crc32c per array that the
writing process computed and the caller passes to `read` (`array_checksums`),
or by a crc32c on every chunk that TensorStore computes as it encodes it and
checks as it decodes it (`chunk_checksums`).

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
- Reads skip Orbax where this process holds every array whole: straight
  into the restore's buffers, checked as they land (`tensorstore_reads`).
  JAX arrays sharded across processes are read by Orbax, which reads each
  process's shards onto their live shardings.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import log
from ft.log import get_logger
from ft.store import array_checksums, chunk_checksums, tensorstore_reads

logger = get_logger()


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


def _read_whole(
    directory: str, target: dict[str, list[Any]], crcs: dict[str, int] | None
) -> dict[str, list[Any]] | None:
    """`tensorstore_reads.read` of `target`'s arrays by their Orbax names; None
    when one is not where Orbax names it."""
    names = [orbax_name(group, index) for group in target for index in range(len(target[group]))]
    return tensorstore_reads.read(directory, target, names, crcs, reading_threads())


def _held_whole(value: Any) -> bool:
    sharding = getattr(value, "sharding", None)
    return sharding is None or bool(getattr(sharding, "is_fully_addressable", False))
