"""One crc32c per array in the record: computed at write, checked as each array is read.

Backups written before (and by a process without google-crc32c's C extension)
carry TensorStore's chunk crc32c codec instead; they still load and their damage
is still found. Runs real `model.fit` on the test process's backend (see conftest.py).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import google_crc32c
import jax
import keras
import numpy as np
import pytest
import tensorstore as ts

import ft
from ft import errors, log
from ft.metadata import BackupRecord
from ft.store import array_checksums
from ft.store import arrays as array_io
from ft.store.posix import PosixStore
from tests.test_backup_and_restore import X, Y, interrupted_fit, make_model
from tests.test_damaged_backups import committed, moved_aside

# Kernels of 8 KiB: OCDBT stores values this large in its data files as they are.
UNITS = 512


def _record(step: int) -> BackupRecord:
    return BackupRecord(0, step, step, step, "jax", 1, "now", {"model": []})


def _arrays() -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(5)
    return {
        "model": [
            rng.normal(size=(300, 200)).astype("float32"),
            # Larger than one `extend` piece: the pieces are chained.
            rng.normal(size=(array_checksums.PIECE // 8 + 1000,)),
            rng.integers(0, 1 << 40, size=(7, 3)),
        ],
        "optimizer": [np.array(11, "int64"), rng.normal(size=(64,)).astype("float16")],
        "metrics": [],
    }


def _target(arrays: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
    return {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}


def _stored(backup: Path) -> dict[str, Any]:
    """Orbax name -> the opened zarr3 array, for every array of a backup, via TensorStore."""
    spec = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{backup}/state/"}}
    keys = ts.KvStore.open(spec).result().list().result()
    names = {k.decode()[: -len("/zarr.json")] for k in keys if k.endswith(b"/zarr.json")}
    return {
        name: ts.open({"driver": "zarr3", "kvstore": {**spec, "path": name + "/"}}).result()
        for name in names
    }


def _chunk_codecs(array: Any) -> list[str]:
    """The names of the codecs of an array's chunks (inside Orbax's shards, not their index)."""
    (outer,) = array.spec().to_json()["metadata"]["codecs"]
    assert outer["name"] == "sharding_indexed"
    return [codec["name"] for codec in outer["configuration"]["codecs"]]


def _flip_inside(backup: Path, value: np.ndarray) -> None:
    """Flip one bit in the middle of `value`'s bytes wherever the backup stores them
    (a small backup can hold them in more than one OCDBT data file)."""
    raw = value.tobytes()
    hits = [
        (path, data.find(raw))
        for path in (backup / "state").rglob("*")
        if path.is_file() and raw in (data := path.read_bytes())
    ]
    assert hits, "the array's bytes are not stored as they are"
    for path, at in hits:
        data = bytearray(path.read_bytes())
        data[at + len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(data))


@pytest.fixture
def codec_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writes take the chunk-codec path (as before array crc32cs, or without the C crc32c)."""
    monkeypatch.setattr(google_crc32c, "implementation", "python")
    monkeypatch.setattr(log, "_said", set())  # said once per process


def _as_version_1(backup: Path) -> None:
    """Rewrite a codec-path backup's record as the ft before array crc32cs wrote it."""
    path = backup / "ft-backup.json"
    body = json.loads(path.read_text())
    assert body.pop("array_crc32c") == {}
    body["version"] = 1
    path.write_text(json.dumps(body))


def test_the_record_holds_each_arrays_crc32c_and_no_chunk_carries_the_codec(
    tmp_path: Path,
) -> None:
    store = PosixStore(tmp_path)
    store.prepare()
    arrays = _arrays()
    path = store.write(_record(1), arrays)
    record = store.verify(path)
    expected = {
        array_io.orbax_name(group, index): google_crc32c.value(value.tobytes())
        for group, values in arrays.items()
        for index, value in enumerate(values)
    }
    assert record.array_crc32c == expected and len(expected) == 5
    stored = _stored(Path(path))
    assert sorted(stored) == sorted(expected)
    assert all(_chunk_codecs(array) == ["bytes"] for array in stored.values())
    for relative, meta in record.files.items():
        if Path(relative).parent.name == "d":
            assert meta.get("array_crc32c") == 1 and "crc32" not in meta
        else:
            assert "crc32" in meta
    out = store.read_arrays(path, _target(arrays))
    for group, values in arrays.items():
        for saved, got in zip(values, out[group], strict=True):
            np.testing.assert_array_equal(got, saved)
    store.close()


@pytest.mark.parametrize("orbax_reads", [False, True], ids=["direct", "orbax"])
def test_a_flipped_byte_in_an_array_is_found_by_its_crc32c(
    orbax_reads: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PosixStore(tmp_path)
    store.prepare()
    arrays = _arrays()
    path = store.write(_record(1), arrays)
    _flip_inside(Path(path), arrays["model"][0])
    store.verify(path)  # sizes and small files intact: only the array's crc32c can tell
    with pytest.raises(errors.CheckpointCorruptedError, match=r"DATA_LOSS: array 'model\.0'"):
        store.verify_all(path)
    target: dict[str, list[Any]] = _target(arrays)
    if orbax_reads:  # Orbax reads, into JAX arrays this process holds whole
        monkeypatch.setattr(array_io, "_read_whole", lambda *args: None)
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = {
            group: [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in values]
            for group, values in arrays.items()
        }
    with pytest.raises(errors.CheckpointCorruptedError, match=r"DATA_LOSS: array 'model\.0'"):
        store.read_arrays(path, target)
    store.close()


def test_fit_falls_back_from_a_backup_with_a_flipped_byte_in_an_array(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup_dir = tmp_path / "b"
    # Kernels too large for OCDBT to inline into its (checksummed) b-tree nodes.
    interrupted_fit(backup_dir, make_model(UNITS), max_to_keep=2)  # saves 2 and 4, dies at 5
    newest = backup_dir / "ft-step-0000000004"
    kernel = _stored(newest)["model.0"].read().result()
    _flip_inside(newest, kernel)

    cb = ft.BackupAndRestore(backup_dir, save_freq=2, delete_checkpoint=False, max_to_keep=2)
    with caplog.at_level(logging.WARNING, logger="ft"):
        make_model(UNITS).fit(X, Y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert cb.restored is not None and cb.restored["step"] == 2
    (aside,) = moved_aside(backup_dir)
    assert aside.startswith(".ft-damaged-4-")
    assert any(
        aside in r.getMessage() and "DATA_LOSS: array 'model.0'" in r.getMessage()
        for r in caplog.records
    )


def test_a_backup_written_with_the_chunk_codec_restores_exactly_and_its_damage_is_found(
    tmp_path: Path, codec_path: None, caplog: pytest.LogCaptureFixture
) -> None:
    store = PosixStore(tmp_path)
    store.prepare()
    arrays = _arrays()
    with caplog.at_level(logging.INFO, logger="ft"):
        store.write(_record(1), arrays)
        path = store.write(_record(2), arrays)
    assert sum("implementation='python'" in r.getMessage() for r in caplog.records) == 1
    _as_version_1(Path(path))
    record = store.verify(path)
    assert record.array_crc32c == {}
    data = {k: v for k, v in record.files.items() if Path(k).parent.name == "d"}
    assert data and all(meta.get("chunk_crc32c") == 1 for meta in data.values())
    assert all(_chunk_codecs(a) == ["bytes", "crc32c"] for a in _stored(Path(path)).values())
    out = store.read_arrays(path, _target(arrays))
    for group, values in arrays.items():
        for saved, got in zip(values, out[group], strict=True):
            assert got.dtype == saved.dtype
            np.testing.assert_array_equal(got, saved)

    _flip_inside(Path(path), arrays["model"][0])
    with pytest.raises(errors.CheckpointCorruptedError, match="DATA_LOSS"):
        store.read_arrays(path, _target(arrays))
    with pytest.raises(errors.CheckpointCorruptedError, match="DATA_LOSS"):
        store.verify_all(path)
    store.close()


def test_fit_resumes_from_a_chunk_codec_backup_and_falls_back_from_a_damaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup_dir = tmp_path / "b"
    with monkeypatch.context() as patch:
        patch.setattr(google_crc32c, "implementation", "python")
        interrupted_fit(backup_dir, make_model(UNITS), max_to_keep=2)
    for name in committed(backup_dir):
        _as_version_1(backup_dir / name)
    newest = backup_dir / "ft-step-0000000004"
    _flip_inside(newest, _stored(newest)["model.0"].read().result())
    cb = ft.BackupAndRestore(backup_dir, save_freq=2, delete_checkpoint=False, max_to_keep=2)
    make_model(UNITS).fit(X, Y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert cb.restored is not None and cb.restored["step"] == 2
    (aside,) = moved_aside(backup_dir)
    assert aside.startswith(".ft-damaged-4-")


def test_a_record_without_array_crc32c_and_marked_files_is_refused(tmp_path: Path) -> None:
    """Files marked as covered by array crc32cs need the crc32cs in the record."""
    store = PosixStore(tmp_path)
    store.prepare()
    path = store.write(_record(1), _arrays())
    record_path = Path(path) / "ft-backup.json"
    body = json.loads(record_path.read_text())
    body["array_crc32c"] = {}
    record_path.write_text(json.dumps(body))
    with pytest.raises(errors.CheckpointCorruptedError, match="holds no checksum"):
        store.verify(path)
    store.close()


def test_crc32c_matches_google_crc32c_for_views_and_scalars() -> None:
    value = np.arange(24, dtype="float32").reshape(4, 6)
    bfloat16 = np.asarray(jax.numpy.arange(5, dtype=jax.numpy.bfloat16))
    for array in [value, value.T, value[::2], np.float32(3.5), np.array(True), bfloat16]:
        expected = google_crc32c.value(np.ascontiguousarray(array).tobytes())
        assert array_checksums.crc32c(np.asarray(array)) == expected
    assert value.flags.writeable  # the caller's array is left writeable


def _runs_beside(crc: Callable[[np.ndarray], int]) -> int:
    """How often this thread ran while another thread checksummed 1 GiB (4 x 256 MiB),
    with a switch interval (10 s) far longer than that: never when the checksum holds
    the GIL, since the other thread then gives it up only when it ends."""
    big = np.ones(256 << 20, np.uint8)
    entered, done = threading.Event(), threading.Event()

    def work() -> None:
        entered.set()
        for _ in range(4):
            crc(big)
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(10.0)
    try:
        thread = threading.Thread(target=work)
        thread.start()
        assert entered.wait(60)
        runs = 0
        while not done.is_set():
            runs += 1
            time.sleep(1e-4)  # gives the GIL back, for the checksum's thread to end
        thread.join(60)
    finally:
        sys.setswitchinterval(interval)
    return runs


@pytest.fixture
def held_gil(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """crc32c takes its fallback: google-crc32c's Python `extend`, which holds the GIL."""
    monkeypatch.setattr(log, "_said", set())
    monkeypatch.setattr(array_checksums, "_find_c_extend", lambda: (None, "not here"))
    array_checksums._gil_free_extend.cache_clear()
    yield
    array_checksums._gil_free_extend.cache_clear()


def test_crc32c_releases_the_gil_for_a_training_thread() -> None:
    """ft calls google-crc32c's C library itself so that a thread dispatching training
    steps runs beside a save's checksum pass (benchmarks/host_contention.py)."""
    assert array_checksums.gil_free()
    assert _runs_beside(array_checksums.crc32c) > 0


def test_crc32c_without_the_gil_free_path_says_so_and_gives_the_same_values(
    held_gil: None, caplog: pytest.LogCaptureFixture
) -> None:
    arrays = _arrays()
    expected = {
        name: google_crc32c.value(np.ascontiguousarray(value).tobytes())
        for name, value in zip(
            [array_io.orbax_name(g, i) for g, vs in arrays.items() for i in range(len(vs))],
            [v for vs in arrays.values() for v in vs],
            strict=True,
        )
    }
    with caplog.at_level(logging.INFO, logger="ft"):
        assert array_checksums.of_arrays(arrays) == expected
        assert not array_checksums.gil_free()
        assert _runs_beside(array_checksums.crc32c) == 0  # the check above can fail
    said = [r.getMessage() for r in caplog.records if "without the GIL" in r.getMessage()]
    assert len(said) == 1 and "not here" in said[0] and "pip install" in said[0]


def test_a_crc32c_function_that_disagrees_with_google_crc32c_is_not_used() -> None:
    import ctypes

    from google_crc32c import _crc32c  # type: ignore[attr-defined]

    right = ctypes.CDLL(_crc32c.__file__).crc32c_extend
    right.restype = ctypes.c_uint32
    right.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    assert array_checksums._disagreement(right) == ""
    assert "standard check value" in array_checksums._disagreement(lambda crc, at, n: 0)
    off_by_one = array_checksums._disagreement(lambda crc, at, n: right(crc, at, n - (n > 9)))
    assert "4099 bytes" in off_by_one


def test_arrays_not_on_the_host_keep_the_chunk_codec(tmp_path: Path) -> None:
    store = PosixStore(tmp_path)
    store.prepare()
    arrays = {"model": [jax.numpy.ones((30, 20)), np.zeros(3, "float32")], "optimizer": []}
    path = store.write(_record(1), arrays)
    record = store.verify(path)
    assert record.array_crc32c == {}
    assert all(_chunk_codecs(a) == ["bytes", "crc32c"] for a in _stored(Path(path)).values())
    store.verify_all(path)
    store.close()


def test_keras_fit_records_every_saved_array(tmp_path: Path) -> None:
    cb = ft.BackupAndRestore(tmp_path / "b", save_freq=4, delete_checkpoint=False)
    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    (name,) = committed(tmp_path / "b")
    backup = tmp_path / "b" / name
    record = BackupRecord.from_json((backup / "ft-backup.json").read_text())
    stored = _stored(backup)
    assert set(record.array_crc32c) == set(stored) and stored
    for array_name, array in stored.items():
        value = np.ascontiguousarray(array.read().result())
        assert record.array_crc32c[array_name] == google_crc32c.value(value.tobytes())
    assert keras.backend.backend() == record.backend
