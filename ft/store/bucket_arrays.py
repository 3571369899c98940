"""Arrays in a bucket through TensorStore's own `gcs` and `s3` drivers.

Orbax (0.12) cannot be pointed at `s3://`: its TensorStore specs know the
`gcs` driver and local files only, and its path layer (etils `epath`) goes
through `tf.io.gfile`, which has no S3, whenever TensorFlow is installed. So a
bucket backup writes each array itself, as a zarr3 array on TensorStore's
kvstore for the bucket, the format Orbax uses underneath:

    <backup>/arrays/<group>/<index>/zarr.json    shape, dtype, chunking, codecs
    <backup>/arrays/<group>/<index>/c/...        one object per chunk

Every chunk ends with a crc32c that TensorStore computes as it encodes the
chunk and checks whenever it decodes it (the zarr3 `crc32c` codec), so a
damaged chunk fails the read instead of loading wrong values, without a
checksum pass of ft's own over the array bytes. Chunks equal to the fill
value are stored too, so a missing chunk object is damage, never zeros.

A host NumPy array is written whole by the process that holds it. A JAX array
is chunked by its sharding, and each process writes only the shards it holds
with `replica_id == 0`, so every chunk has exactly one writer; its metadata
is written by the primary process (`write_metadata`) before any data.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ft.store.bucket_paths import BucketURL, kvstore_spec

ARRAYS = "arrays"
# Chunks stay below this many bytes: one object each, one request each.
MAX_CHUNK_BYTES = 64 << 20


def _ts() -> Any:
    import tensorstore as ts

    return ts


def _items(arrays: dict[str, list[Any]]) -> Iterator[tuple[str, int, Any]]:
    for group in sorted(arrays):
        for index, value in enumerate(arrays[group]):
            yield group, index, value


def _chunk_shape(value: Any) -> list[int]:
    """The shard shape (a JAX array's) or the whole shape, cut along axis 0 to fit."""
    shape = tuple(int(d) for d in value.shape)
    sharding = getattr(value, "sharding", None)
    unit = list(sharding.shard_shape(shape) if sharding is not None else shape)
    if not unit:
        return []
    itemsize = np.dtype(value.dtype).itemsize
    rest = int(np.prod(unit[1:], dtype=np.int64)) * itemsize
    first = unit[0]
    # The largest divisor of the first axis whose chunk fits MAX_CHUNK_BYTES,
    # so chunks still tile each shard exactly.
    for rows in range(first, 0, -1):
        if first % rows == 0 and rows * rest <= MAX_CHUNK_BYTES:
            unit[0] = rows
            break
    return [max(d, 1) for d in unit]


def _metadata(value: Any) -> dict[str, Any]:
    shape = [int(d) for d in value.shape]
    return {
        "shape": shape,
        "data_type": np.dtype(value.dtype).name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": _chunk_shape(value)}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
    }


def _spec(location: BucketURL, backup: str, group: str, index: int) -> dict[str, Any]:
    return {
        "driver": "zarr3",
        "kvstore": kvstore_spec(location, backup, ARRAYS, group, str(index)),
        "store_data_equal_to_fill_value": True,
    }


def write_metadata(
    location: BucketURL, backup: str, arrays: dict[str, list[Any]], context: Any
) -> None:
    """Create every array's `zarr.json`. Primary process only, before any `write_data`."""
    ts = _ts()
    futures = [
        ts.open(
            {**_spec(location, backup, group, index), "metadata": _metadata(value)},
            create=True,
            context=context,
        )
        for group, index, value in _items(arrays)
    ]
    for future in futures:
        future.result()


def write_data(
    location: BucketURL, backup: str, arrays: dict[str, list[Any]], context: Any
) -> None:
    """Write the chunks this process holds. Call on every process that writes."""
    ts = _ts()
    opened = []
    for group, index, value in _items(arrays):
        spec = {**_spec(location, backup, group, index), "metadata": _metadata(value)}
        opened.append((ts.open(spec, open=True, assume_metadata=True, context=context), value))
    writes = []
    for future, value in opened:
        store = future.result()
        shards = getattr(value, "addressable_shards", None)
        if shards is None:
            writes.append(store.write(np.asarray(value)))
            continue
        for shard in shards:
            if shard.replica_id == 0:
                writes.append(store[shard.index].write(np.asarray(shard.data)))
    for write in writes:
        write.result()


def read(
    location: BucketURL, backup: str, target: dict[str, list[Any]], context: Any
) -> dict[str, list[Any]]:
    """Read every array of `backup` shaped like `target`. Any process.

    A `jax.ShapeDtypeStruct` with a sharding in `target` is read as a JAX
    array on that sharding, each process reading the chunks its shards need;
    anything else as a host NumPy array. TensorStore checks each chunk's
    crc32c as it decodes it.

    Raises:
        ValueError: from TensorStore, when an array's metadata is missing or
            does not match `target`, or a chunk is missing or fails its checksum.
    """
    ts = _ts()
    items = list(_items(target))
    futures = [
        ts.open(_spec(location, backup, group, index), open=True, context=context)
        for group, index, _ in items
    ]
    stores = [future.result() for future in futures]
    out: dict[str, list[Any]] = {group: [None] * len(target[group]) for group in target}
    pending = []
    for (group, index, want), store in zip(items, stores, strict=True):
        shape = tuple(int(d) for d in want.shape)
        if tuple(store.shape) != shape or np.dtype(store.dtype.numpy_dtype) != np.dtype(want.dtype):
            raise ValueError(
                f"array {group}/{index} is stored with shape {tuple(store.shape)} and dtype "
                f"{store.dtype.numpy_dtype}, expected {shape} and {np.dtype(want.dtype)}"
            )
        sharding = getattr(want, "sharding", None)
        if sharding is None:
            pending.append((group, index, store.read()))
            continue
        import jax

        def region_of(region: Any, store: Any = store) -> Any:
            return store[region].read().result()

        out[group][index] = jax.make_array_from_callback(shape, sharding, region_of)
    for group, index, future in pending:
        out[group][index] = future.result()
    return out


def expected_objects(arrays: dict[str, list[Any]]) -> set[str]:
    """Every object `write_metadata` and `write_data` write for `arrays`."""
    out = set()
    for group, index, value in _items(arrays):
        base = f"{ARRAYS}/{group}/{index}"
        out.add(f"{base}/zarr.json")
        shape = [int(d) for d in value.shape]
        chunks = _chunk_shape(value)
        grid = [-(-s // c) for s, c in zip(shape, chunks, strict=True)]
        for position in np.ndindex(*grid) if grid else [()]:
            out.add(f"{base}/c" + "".join(f"/{p}" for p in position))
    return out
