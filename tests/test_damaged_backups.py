"""A damaged backup costs only itself: `max_to_keep`, `double_checkpoint`, moving aside.

Runs real `model.fit` on the test process's backend (see conftest.py).
"""

from __future__ import annotations

import inspect
import logging
import os
import subprocess
import sys
from pathlib import Path

import google_crc32c
import keras
import numpy as np
import pytest

import ft
from ft import errors
from ft.metadata import BackupRecord
from ft.store.posix import PosixStore as CheckpointStore
from tests.helpers import ROOT
from tests.test_backup_and_restore import X, Y, interrupted_fit, make_model


def committed(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir() if p.name.startswith("ft-step-"))


def moved_aside(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir() if p.name.startswith(".ft-damaged-"))


def flip_middle_of_largest_file(backup: Path) -> Path:
    victim = max(
        (p for p in (backup / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    return victim


def test_positional_arguments_match_installed_keras() -> None:
    theirs = list(inspect.signature(keras.callbacks.BackupAndRestore).parameters.values())
    ours = list(inspect.signature(ft.BackupAndRestore).parameters.values())
    assert [(p.name, p.kind, p.default) for p in theirs] == [
        (p.name, p.kind, p.default) for p in ours[: len(theirs)]
    ]
    extra = {p.name: p.kind for p in ours[len(theirs) :]}
    assert extra.pop("save_before_preemption") == inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert set(extra) == {"max_to_keep", "timeout", "async_save"}
    assert set(extra.values()) == {inspect.Parameter.KEYWORD_ONLY}


def test_keras_positional_call_means_what_it_means_in_keras(tmp_path: Path) -> None:
    cb = ft.BackupAndRestore(tmp_path, "epoch", True, False)
    assert (cb.double_checkpoint, cb.delete_checkpoint, cb.save_before_preemption) == (
        True,
        False,
        False,
    )
    assert cb._store.max_to_keep == 2
    assert (
        ft.BackupAndRestore(tmp_path, max_to_keep=3, double_checkpoint=True)._store.max_to_keep == 3
    )
    assert ft.BackupAndRestore(tmp_path)._store.max_to_keep == 1


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2", None])
def test_invalid_max_to_keep_is_refused(bad, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `max_to_keep`. Received: max_to_keep="
    ):
        ft.BackupAndRestore(tmp_path, max_to_keep=bad)


def test_max_to_keep_keeps_the_newest_backups(tmp_path: Path) -> None:
    cb = ft.BackupAndRestore(tmp_path / "b", save_freq=1, delete_checkpoint=False, max_to_keep=3)
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert committed(tmp_path / "b") == [
        "ft-step-0000000014",
        "ft-step-0000000015",
        "ft-step-0000000016",
    ]


@pytest.mark.parametrize("keep", [{"double_checkpoint": True}, {"max_to_keep": 2}])
def test_damaged_newest_backup_falls_back_and_is_moved_aside(
    keep: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backup_dir = tmp_path / "b"
    interrupted_fit(backup_dir, **keep)  # saves steps 2 and 4, crashes at 5
    assert committed(backup_dir) == ["ft-step-0000000002", "ft-step-0000000004"]
    flip_middle_of_largest_file(backup_dir / "ft-step-0000000004")

    cb = ft.BackupAndRestore(backup_dir, save_freq=2, delete_checkpoint=False, **keep)
    counter = keras.callbacks.LambdaCallback()
    with caplog.at_level(logging.WARNING, logger="ft"):
        history = make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[cb, counter], verbose=0)
    assert cb.restored is not None and cb.restored["step"] == 2
    assert len(history.history["loss"]) == 2
    (aside,) = moved_aside(backup_dir)
    assert aside.startswith(".ft-damaged-4-")
    assert any(aside in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # New saves are kept (step 4 written afresh, then pushed out by newer ones).
    assert committed(backup_dir) == ["ft-step-0000000014", "ft-step-0000000016"]

    # The next run resumes from the newest intact backup, not the damaged one.
    again = ft.BackupAndRestore(backup_dir, **keep)
    make_model().fit(X, Y, batch_size=4, epochs=3, callbacks=[again], verbose=0)
    assert again.restored is not None and again.restored["step"] == 16
    assert not backup_dir.exists()  # delete_checkpoint removed the damaged one too


def test_without_an_intact_backup_nothing_is_moved_and_damage_is_raised(tmp_path: Path) -> None:
    backup_dir = tmp_path / "b"
    interrupted_fit(backup_dir, max_to_keep=2)
    for name in committed(backup_dir):
        flip_middle_of_largest_file(backup_dir / name)
    with pytest.raises(errors.CheckpointCorruptedError, match="ft-step-0000000004"):
        make_model().fit(
            X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(backup_dir)], verbose=0
        )
    assert committed(backup_dir) == ["ft-step-0000000002", "ft-step-0000000004"]
    assert moved_aside(backup_dir) == []


def _record(step: int) -> BackupRecord:
    return BackupRecord(0, step, step, step, "jax", 1, "now", {"model": []})


def test_a_save_of_a_damaged_step_replaces_it(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, max_to_keep=2)
    store.prepare()
    arrays = {"model": [np.arange(1000, dtype="float32")]}
    store.write(_record(3), arrays)
    path = store.write(_record(5), arrays)
    flip_middle_of_largest_file(Path(path))
    with pytest.raises(errors.CheckpointCorruptedError):
        store.verify_all(path)

    assert store.write(_record(5), arrays) == path
    store.verify_all(path)
    assert committed(tmp_path) == ["ft-step-0000000003", "ft-step-0000000005"]
    (aside,) = store.damaged()
    assert Path(aside).name.startswith(".ft-damaged-5-")
    store.close()


@pytest.mark.parametrize("mark", ["array_crc32c", "chunk_crc32c"])
def test_a_flipped_byte_anywhere_in_an_array_file_is_never_loaded(
    mark: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flip bytes across every OCDBT data file: each read fails or returns the saved values.

    Arrays checked by their crc32c in the record, or (as written before, and
    without google-crc32c's C extension) by TensorStore's chunk crc32c codec.
    """
    if mark == "chunk_crc32c":
        monkeypatch.setattr(google_crc32c, "implementation", "python")
    store = CheckpointStore(tmp_path)
    store.prepare()
    rng = np.random.default_rng(1)
    arrays = {
        "model": [rng.normal(size=s).astype("float32") for s in [(3,), (300,), (200, 300)]],
        "optimizer": [np.array(7, "int64")],
    }
    path = Path(store.write(_record(1), arrays))
    record = store.verify(str(path))
    data_files = [p for p in (path / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data_files and all(record.files[str(p.relative_to(path))].get(mark) for p in data_files)
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    detected = 0
    for victim in data_files:
        original = victim.read_bytes()
        for position in sorted(
            {*range(0, len(original), max(1, len(original) // 12)), len(original) // 2}
        ):
            damaged = bytearray(original)
            damaged[position] ^= 0x20
            victim.write_bytes(bytes(damaged))
            try:
                out = store.read_arrays(str(path), target)
            except errors.CheckpointCorruptedError:
                detected += 1
            else:  # bytes no read touches (a superseded OCDBT node): values still exact
                for group, values in arrays.items():
                    for saved, loaded in zip(values, out[group], strict=True):
                        np.testing.assert_array_equal(np.asarray(loaded), saved)
        victim.write_bytes(original)
    assert detected > 0
    store.close()


# gs:// and s3:// have their store (tests/test_bucket_store.py); other URLs are refused.
@pytest.mark.parametrize("url", ["az://container/run-1", "hdfs://namenode/run-1", "HTTP://b/x"])
def test_other_url_schemes_are_refused(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(errors.UnsupportedConfigurationError, match="URL") as info:
        ft.BackupAndRestore(url)
    assert isinstance(info.value, ValueError) and url in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no local folder named "az:" or "hdfs:"


def test_inspect_refuses_an_unsupported_url_with_exit_code_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ft", "inspect", "az://container/run-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "az:// URL" in proc.stderr and list(tmp_path.iterdir()) == []
