"""Read the arrays of a local Orbax checkpoint straight into their host buffers.

Called by the restoring process (every process that reads whole arrays),
from `ft.store.tensorstore_reads`. TensorStore reads each zarr3 chunk into a buffer of
its own and then copies it into the caller's: on 2 cores, 0.10 s of CPU per
0.26 GB of state where the bytes take 0.04 s to land from the page cache,
and a cold restore took 1.5 x a cold read of the same files
(`docs/benchmark.md`).

Orbax writes every array this process holds whole as one zarr3 shard: the
array's raw bytes, then the shard's index (one offset and length, and the
index's own crc32c). That shard is one value of the checkpoint's OCDBT
database, held in an OCDBT data file (or inline in a B-tree node, when tiny).
TensorStore's own `ts.ocdbt.dump` says where each value lies (data file,
offset, length); this module reads each array's bytes and its shard index
with one `preadv` straight into the destination buffer, and checks the
array's crc32c from the backup's record as it lands. The arrays are read in
file order, cut into a few runs of about equal bytes, one thread and one
descriptor per run.

That layout is what Orbax and TensorStore write today, not a promise. Every
part of it is checked for every array: the zarr.json (one chunk holding the
whole array, raw little-endian bytes, the index at the end with its
crc32c), the value's length, the shard index and its crc32c, and the
array's recorded crc32c. Where anything differs, `read` returns the reason
and the caller reads through TensorStore, which then decides whether the
backup is damaged. `read` never raises for what it finds in the files.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ft.store import array_checksums

_INDEX = struct.Struct("<QQ")  # the shard index of one inner chunk: offset, length
_INDEX_BYTES = _INDEX.size + 4  # and its crc32c
_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}
_SLASH = {"name": "default", "configuration": {"separator": "/"}}


class Unusable(Exception):
    """The checkpoint is not laid out as this module reads it."""


class Mismatch(Unusable):
    """Bytes read fail a checksum: damage, or a layout the checks did not catch."""


@dataclass(frozen=True)
class Fallback:
    """Why `read` did not read every array: read them through TensorStore."""

    reason: str
    #: The bytes failed a check, or the reader failed as no file should make
    #: it: worth a warning if TensorStore then reads the same arrays intact.
    mismatch: bool = False


@dataclass
class _Where:
    """Where one array's shard lies: in `path` at `offset`, or inline in `value`."""

    name: str
    buffer: np.ndarray
    path: str = ""
    offset: int = 0
    value: bytes | None = None


def read(
    directory: str,
    requests: Sequence[tuple[str, np.ndarray]],
    crcs: dict[str, int],
    landed: Callable[[int], None],
    threads: int,
) -> Fallback | None:
    """Read every requested array of the OCDBT checkpoint in `directory`; None when done.

    `requests` are (Orbax name, destination) pairs: each destination is a
    writable C-contiguous host array of the stored shape and dtype. `crcs`
    holds every array's recorded crc32c. `landed(i)` runs on the calling
    thread once request `i` is read and checked, in order, while later ones
    are still being read. The arrays are read as at most `threads` runs of
    the files, each on a thread of its own.

    Returns:
        None when every array was read and matched its crc32c, else a
        `Fallback` that says why not (the destinations then hold partial
        data, and `landed` may have run for some: read them all again).
    """
    if sys.byteorder != "little":
        return Fallback("this machine is not little-endian")
    try:
        wheres = _locate(directory, requests)
    except (Unusable, OSError, ValueError, LookupError, TypeError) as e:
        return Fallback(f"{type(e).__name__}: {e}")
    order = sorted(range(len(wheres)), key=lambda i: (wheres[i].path, wheres[i].offset))
    done: list[Future[None]] = [Future() for _ in wheres]
    stop = threading.Event()
    with ThreadPoolExecutor(threads, thread_name_prefix="ft-read") as pool:
        for part in _parts(order, wheres, threads):
            pool.submit(_read_part, part, wheres, crcs, done, stop)
        try:
            for index in range(len(wheres)):  # handed over in request order
                done[index].result()
                landed(index)
        except Exception as e:
            stop.set()
            # A mismatch, or an error no file should cause, is reported if
            # TensorStore then reads the same arrays intact.
            surprising = isinstance(e, Mismatch) or not isinstance(e, (Unusable, OSError))
            return Fallback(f"{type(e).__name__}: {e}", surprising)
    return None


def _parts(order: list[int], wheres: list[_Where], count: int) -> list[list[int]]:
    """`order` (file order) cut into at most `count` runs of about equal bytes."""
    total = sum(wheres[i].buffer.nbytes for i in order) or 1
    parts: list[list[int]] = [[] for _ in range(count)]
    before = 0
    for i in order:
        size = wheres[i].buffer.nbytes
        # Each array goes to the run its middle byte falls in.
        parts[min(count - 1, (2 * before + size) * count // (2 * total))].append(i)
        before += size
    return [part for part in parts if part]


def _read_part(
    part: list[int],
    wheres: list[_Where],
    crcs: dict[str, int],
    done: list[Future[None]],
    stop: threading.Event,
) -> None:
    """Read one run of arrays in file order, through descriptors of its own. A reading thread.

    Each run is one sequential stream with its own descriptor, so the
    kernel's readahead follows it: threads sharing one descriptor, each
    reading every other array, defeated it (a cold restore of 0.26 GB on 2
    cores: 1.15-1.40 x a cold read of the files, against 0.99-1.10 x in
    runs; `docs/benchmark.md`).
    """
    descriptors: dict[str, int] = {}
    try:
        for position, i in enumerate(part):
            if stop.is_set():
                error: BaseException = Unusable("the read was abandoned")
                for j in part[position:]:
                    done[j].set_exception(error)
                return
            where = wheres[i]
            try:
                fd = -1
                if where.value is None:
                    if where.path not in descriptors:
                        descriptors[where.path] = os.open(where.path, os.O_RDONLY)
                    fd = descriptors[where.path]
                _read_one(where, fd, crcs)
            except BaseException as e:  # handed to the caller, in request order
                for j in part[position:]:
                    done[j].set_exception(e)
                return
            done[i].set_result(None)
    finally:
        for fd in descriptors.values():
            os.close(fd)


def _locate(directory: str, requests: Sequence[tuple[str, np.ndarray]]) -> list[_Where]:
    """Where each requested array's shard lies, from TensorStore's dump of the database."""
    import tensorstore as ts

    root = os.path.abspath(directory)
    kvstore = ts.KvStore.open({"driver": "file", "path": root + "/"}).result()
    manifest = ts.ocdbt.dump(kvstore).result()
    version = manifest["versions"][-1]
    if version["root_height"] != 0:
        raise Unusable("its B-tree has more than one level")
    node = ts.ocdbt.dump(kvstore, version["root"]["location"]).result()
    entries = {bytes(entry["key"]): entry for entry in node["entries"]}
    wheres = []
    for name, buffer in requests:
        if not buffer.flags.c_contiguous or not buffer.flags.writeable:
            raise Unusable(f"the destination of {name!r} is not a writable C-contiguous array")
        metadata = json.loads(bytes(entries[f"{name}/zarr.json".encode()]["inline_value"]))
        _check_metadata(name, metadata, buffer)
        key = name + "/c" + "".join("/0" for _ in buffer.shape)
        entry = entries[key.encode()]
        if "inline_value" in entry:
            wheres.append(_Where(name, buffer, value=bytes(entry["inline_value"])))
            continue
        kind, base, relative, offset, length = entry["indirect_value"].split(":")
        if kind != "value" or int(length) != buffer.nbytes + _INDEX_BYTES:
            raise Unusable(f"array {name!r} is stored as {entry['indirect_value']}")
        path = os.path.normpath(
            os.path.join(root, urllib.parse.unquote(base) + urllib.parse.unquote(relative))
        )
        if not path.startswith(root + os.sep):
            raise Unusable(f"array {name!r} is stored outside {root}")
        wheres.append(_Where(name, buffer, path=path, offset=int(offset)))
    return wheres


def _check_metadata(name: str, metadata: dict[str, Any], buffer: np.ndarray) -> None:
    """Raise `Unusable` unless the zarr.json says: one chunk, the whole array, raw bytes."""
    shape = list(buffer.shape)
    inner = [_LITTLE] if buffer.dtype.itemsize > 1 else [_LITTLE, {"name": "bytes"}]
    sharding = metadata.get("codecs", [{}])[0]
    config = sharding.get("configuration", {})
    expected = (
        metadata.get("zarr_format") == 3
        and metadata.get("node_type") == "array"
        and metadata.get("shape") == shape
        and metadata.get("data_type") == buffer.dtype.name
        and metadata.get("chunk_grid")
        == {"name": "regular", "configuration": {"chunk_shape": shape}}
        and metadata.get("chunk_key_encoding") in ({"name": "default"}, _SLASH)
        and len(metadata.get("codecs", [])) == 1
        and sharding.get("name") == "sharding_indexed"
        and config.get("chunk_shape") == shape
        and len(config.get("codecs", [])) == 1
        and config["codecs"][0] in inner
        and config.get("index_codecs") == [_LITTLE, {"name": "crc32c"}]
        and config.get("index_location", "end") == "end"
        and buffer.size > 0
    )
    if not expected:
        raise Unusable(f"array {name!r} is not one raw chunk: {json.dumps(metadata)[:300]}")


def _read_one(where: _Where, fd: int, crcs: dict[str, int]) -> None:
    """Read one array's bytes and shard index (from `fd`, unless inline); check both.

    A reading thread.
    """
    index = memoryview(bytearray(_INDEX_BYTES))
    data = where.buffer.reshape(-1).view(np.uint8).data  # bfloat16 has no buffer format
    if where.value is not None:
        if len(where.value) != len(data) + _INDEX_BYTES:
            raise Unusable(f"array {where.name!r}: inline value of {len(where.value)} bytes")
        data[:] = where.value[: len(data)]
        index[:] = where.value[len(data) :]
    else:
        done, total = 0, len(data) + _INDEX_BYTES
        while done < total:
            parts = [data[done:], index] if done < len(data) else [index[done - len(data) :]]
            got = os.preadv(fd, parts, where.offset + done)
            if got <= 0:
                raise Unusable(f"array {where.name!r}: {where.path} ends early")
            done += got
    offset, length = _INDEX.unpack_from(index)
    stored_crc = int.from_bytes(index[_INDEX.size :], "little")
    if array_checksums.crc32c(np.frombuffer(index[: _INDEX.size], np.uint8)) != stored_crc:
        raise Mismatch(f"array {where.name!r}: its shard index fails its crc32c")
    if (offset, length) != (0, len(data)):
        raise Unusable(f"array {where.name!r}: its shard index says {offset}, {length}")
    if array_checksums.crc32c(where.buffer) != crcs.get(where.name):
        raise Mismatch(f"array {where.name!r} does not match its recorded crc32c")
