"""The arrays of a backup, through Orbax and TensorStore, for every kind of store.

Orbax writes and reads the arrays (a zarr3 array per variable in an OCDBT
database, every chunk with a crc32c: `chunk_checksums`); TensorStore's drivers
reach local paths and buckets alike, so a store passes only a path. Nothing
here knows how a backup is committed.
"""

from __future__ import annotations

from typing import Any

from ft.store import chunk_checksums


def new_checkpointer() -> Any:
    """A synchronous, uncompressed Orbax checkpointer for ft's array trees."""
    import orbax.checkpoint as ocp

    # Uncompressed: model state barely compresses, and zstd doubled the
    # write time of a 1 GB state on 2 cores (benchmarks/checkpoint_overhead.py).
    # Synchronous Orbax: ft already runs it off the training thread on a
    # private snapshot, and Orbax's async path would copy the state again.
    handler = ocp.PyTreeCheckpointHandler(use_compression=False, use_zarr3=True)
    return ocp.Checkpointer(handler)


def write(checkpointer: Any, directory: str, arrays: Any, owner: str) -> bool:
    """Write `arrays` to `directory`; True when every chunk got a crc32c.

    `owner` is the directory ft registered for the codec (Orbax writes under a
    temporary name of its own inside it, then renames).
    """
    import orbax.checkpoint as ocp

    with chunk_checksums.checksummed(owner) as tracker:
        checkpointer.save(directory, args=ocp.args.PyTreeSave(arrays))
    return tracker.applied


def read(checkpointer: Any, directory: str, target: Any) -> Any:
    """Read the arrays in `directory` shaped like `target`, chunk checksums checked.

    Raises:
        ValueError or OSError: as TensorStore reports damage (`DATA_LOSS` for
            a checksum mismatch, `OUT_OF_RANGE` for a short file).
    """
    import orbax.checkpoint as ocp

    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return checkpointer.restore(
        directory, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
    )


def read_every(kvstore: dict[str, Any]) -> None:
    """Read every array of the OCDBT database at `kvstore` (a TensorStore kvstore spec).

    One array at a time (its chunks in parallel), each chunk's crc32c and
    each OCDBT node's checksum checked; no Orbax call, so no collective under
    JAX multi-host: one process can run it alone.

    Raises:
        ValueError or OSError: naming the array that failed, from TensorStore.
    """
    import tensorstore as ts

    spec = {"driver": "ocdbt", "base": kvstore}
    keys = ts.KvStore.open(spec).result().list().result()
    names = sorted({k.decode()[: -len("zarr.json")] for k in keys if k.endswith(b"zarr.json")})
    for name in names:
        try:
            array = ts.open({"driver": "zarr3", "kvstore": {**spec, "path": name}}, open=True)
            array.result().read().result()
        except (OSError, ValueError) as e:
            raise type(e)(f"array {name.rstrip('/')!r}: {e}") from e
