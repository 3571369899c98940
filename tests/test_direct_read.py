"""A restore reads each array's bytes straight from Orbax's files into its destination.

`ft.store.direct_read` relies on the layout Orbax and TensorStore write: these
tests hold it to real backups of many dtypes and sizes, and show that where
the layout or the bytes differ it hands over to TensorStore instead of
guessing, so damage is still found and named.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import ft
from ft import errors
from ft.metadata import BackupRecord
from ft.store import array_checksums, direct_read
from ft.store import arrays as array_io
from ft.store.posix import PosixStore
from tests.test_backup_and_restore import X, Y, interrupted_fit, make_model


def _arrays() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(11)
    return {
        "model": [
            rng.normal(size=(300, 200)).astype("float32"),  # in an OCDBT data file
            rng.normal(size=(5,)).astype("float32"),  # inline in the B-tree node
            rng.normal(size=(2, 3, 4)),
            rng.normal(size=(64, 33)).astype(ml_dtypes.bfloat16),
            rng.integers(0, 1 << 40, size=(700, 3)),
        ],
        "optimizer": [
            np.array(11, "int64"),
            rng.random(size=(4000,)) < 0.5,
            rng.integers(-100, 100, size=(3000,)).astype("int8"),
            rng.normal(size=(64,)).astype("float16"),
        ],
        "metrics": [np.array(2.5, "float32")],
    }


def _saved(tmp_path: Path) -> tuple[PosixStore, str, dict[str, list[np.ndarray]]]:
    arrays = _arrays()
    store = PosixStore(tmp_path)
    store.prepare()
    path = store.write(BackupRecord(0, 1, 1, 1, "jax", 1, "now", {"model": []}), arrays)
    return store, path, arrays


def _requests(arrays: dict[str, list[np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    return [
        (array_io.orbax_name(group, index), np.full_like(value, 7))
        for group, values in arrays.items()
        for index, value in enumerate(values)
    ]


def _flat(arrays: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    return [value for values in arrays.values() for value in values]


def test_the_files_are_cut_into_runs_in_file_order_of_about_equal_bytes() -> None:
    sizes = [100, 1, 1, 100, 50, 50, 1, 100]  # bytes, in file order
    wheres = [
        direct_read._Where(f"a{i}", np.zeros(size, np.uint8), path="f", offset=i)
        for i, size in enumerate(sizes)
    ]
    order = list(range(len(sizes)))
    for count in (1, 2, 3, 4, 20):
        parts = direct_read._parts(order, wheres, count)
        assert [i for part in parts for i in part] == order  # every array once, in order
        assert 1 <= len(parts) <= count
        largest = max(sum(sizes[i] for i in part) for part in parts)
        assert largest <= sum(sizes) / len(parts) + max(sizes), (count, parts)
    assert direct_read._parts(order, wheres, 3) == [[0, 1, 2], [3, 4], [5, 6, 7]]


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_every_array_lands_exactly_in_its_destination_in_order(
    tmp_path: Path, threads: int
) -> None:
    store, path, arrays = _saved(tmp_path)
    requests = _requests(arrays)
    order: list[int] = []
    crcs = store.read_record(path).array_crc32c
    assert direct_read.read(f"{path}/state", requests, crcs, order.append, threads) is None
    assert order == list(range(len(requests)))
    for (name, got), saved in zip(requests, _flat(arrays), strict=True):
        assert got.dtype == saved.dtype and got.shape == saved.shape, name
        assert got.tobytes() == saved.tobytes(), name
    store.close()


def test_fit_restores_through_the_direct_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted_fit(tmp_path)
    results = []
    read = direct_read.read

    def watched(*args: Any) -> Any:
        results.append(read(*args))
        return results[-1]

    monkeypatch.setattr(direct_read, "read", watched)
    callback = ft.BackupAndRestore(tmp_path, save_freq=2)
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
    assert callback.restored is not None
    assert results == [None], "the restore read every array directly"


def test_arrays_written_with_the_chunk_codec_are_read_by_tensorstore(tmp_path: Path) -> None:
    arrays = _arrays()
    checkpointer = array_io.new_checkpointer()
    state = str(tmp_path / "state")
    # TensorStore's chunk crc32c codec inside every shard: a layout `direct_read` does not read.
    assert array_io.write(checkpointer, state, arrays, owner=str(tmp_path))
    crcs = array_checksums.of_arrays(arrays)
    fallback = direct_read.read(state, _requests(arrays), crcs, lambda i: None, 2)
    assert fallback is not None and not fallback.mismatch
    assert "is not one raw chunk" in fallback.reason and "crc32c" in fallback.reason
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    out = array_io.read(array_io.new_handler, state, target, crcs)
    for got, saved in zip(_flat(out), _flat(arrays), strict=True):
        assert got.tobytes() == saved.tobytes()
    checkpointer.close()


def test_a_flipped_array_byte_is_a_mismatch_and_the_restore_names_the_array(
    tmp_path: Path,
) -> None:
    store, path, arrays = _saved(tmp_path)
    kernel = arrays["model"][0]
    data = max((Path(path) / "state").rglob("*"), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    at = raw.find(kernel.tobytes()) + kernel.nbytes // 2
    raw[at] ^= 0x01
    data.write_bytes(bytes(raw))
    crcs = store.read_record(path).array_crc32c
    fallback = direct_read.read(f"{path}/state", _requests(arrays), crcs, lambda i: None, 2)
    assert fallback is not None and fallback.mismatch
    assert "'model.0' does not match its recorded crc32c" in fallback.reason
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    with pytest.raises(errors.CheckpointCorruptedError, match=r"DATA_LOSS: array 'model\.0'"):
        store.read_arrays(path, target)
    store.close()


def test_a_truncated_data_file_is_handed_to_tensorstore_which_reports_it(
    tmp_path: Path,
) -> None:
    store, path, arrays = _saved(tmp_path)
    data = max((Path(path) / "state").rglob("*"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    crcs = store.read_record(path).array_crc32c
    fallback = direct_read.read(f"{path}/state", _requests(arrays), crcs, lambda i: None, 2)
    assert fallback is not None and "ends early" in fallback.reason
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    with pytest.raises(errors.CheckpointCorruptedError, match="cannot be read"):
        store.read_arrays(path, target)
    store.close()


def test_a_target_of_another_shape_gets_tensorstores_clear_error(tmp_path: Path) -> None:
    store, path, arrays = _saved(tmp_path)
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    target["model"][0] = np.zeros((200, 300), "float32")
    requests = [(array_io.orbax_name("model", 0), target["model"][0])]
    crcs = store.read_record(path).array_crc32c
    fallback = direct_read.read(f"{path}/state", requests, crcs, lambda i: None, 2)
    assert fallback is not None and "not one raw chunk" in fallback.reason
    with pytest.raises(errors.CheckpointCorruptedError, match=r"shape \(300, 200\)"):
        store.read_arrays(path, target)
    store.close()


def test_a_direct_read_that_disagrees_with_tensorstore_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, path, arrays = _saved(tmp_path)
    read_one = direct_read._read_one

    def misread(where: Any, descriptors: Any, crcs: Any) -> None:
        # A layout change the checks before the bytes did not catch: wrong bytes land.
        read_one(where, descriptors, crcs)
        if where.name == "model.0":
            where.buffer.reshape(-1)[0] += 1
            if array_checksums.crc32c(where.buffer) != crcs[where.name]:
                raise direct_read.Mismatch(f"array {where.name!r} does not match")

    monkeypatch.setattr(direct_read, "_read_one", misread)
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    with caplog.at_level(logging.WARNING, logger="ft"):
        out = store.read_arrays(path, target)
    for got, saved in zip(_flat(out), _flat(arrays), strict=True):
        assert got.tobytes() == saved.tobytes()
    assert "ft's direct reader disagreed with TensorStore" in caplog.text
    store.close()
