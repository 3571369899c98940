"""ft.BackupAndRestore in one process: arguments, errors, storage and deletion.

Runs real `model.fit` on the test process's backend (see conftest.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

import ft
from ft import errors, save_pipeline
from ft.store import posix_lock
from tests.helpers import ROOT, engine_env

X = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def make_model(units: int = 8, optimizer: str = "adam") -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    return model


class CountBatches(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class Crash(keras.callbacks.Callback):
    def __init__(self, at_batch: int) -> None:
        super().__init__()
        self.at, self.n = at_batch, 0

    def on_train_batch_end(self, batch, logs=None):
        self.n += 1
        if self.n == self.at:
            raise RuntimeError("interrupted")


def interrupted_fit(backup_dir: Path, model: keras.Model | None = None, **kwargs) -> None:
    callback = ft.BackupAndRestore(backup_dir, save_freq=2, **kwargs)
    with pytest.raises(RuntimeError, match="interrupted"):
        (model or make_model()).fit(
            X, Y, batch_size=4, epochs=2, callbacks=[callback, Crash(5)], verbose=0
        )


@pytest.mark.parametrize("bad", [0, -1, 2.5, "batch", None, True, "Epoch", [1]])
def test_invalid_save_freq_is_refused_at_construction(bad, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"Invalid value for argument `save_freq`. Received: save_freq="
    ):
        ft.BackupAndRestore(tmp_path, save_freq=bad)


def test_save_freq_false_needs_save_before_preemption(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_before_preemption=True"):
        ft.BackupAndRestore(tmp_path, save_freq=False)


@pytest.mark.parametrize("bad", ["", None, 3])
def test_invalid_backup_dir_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="Invalid value for argument `backup_dir`"):
        ft.BackupAndRestore(bad)


def test_valid_arguments_are_kept(tmp_path: Path) -> None:
    cb = ft.BackupAndRestore(tmp_path, save_freq=np.int64(3), delete_checkpoint=False)
    assert (cb.save_freq, cb.delete_checkpoint, cb.backup_dir) == (3, False, str(tmp_path))


def test_doctest_example_gives_six(backend: str, tmp_path: Path) -> None:
    """The docstring's example, in a fresh process per backend (unbuilt Sequential)."""
    script = f"""
import doctest, keras, numpy as np, ft
doc = ft.BackupAndRestore.__doc__.replace('/tmp/backup', {str(tmp_path / "backup")!r})
test = doctest.DocTestParser().get_doctest(doc, dict(keras=keras, np=np, ft=ft), 'ex', None, 0)
runner = doctest.DocTestRunner()
runner.run(test)
print('RESULT', runner.summarize(verbose=False))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert "RESULT TestResults(failed=0," in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "restored epoch 4, batch 0" in proc.stderr
    assert not (tmp_path / "backup").exists()


def test_incompatible_model_is_refused_naming_dir_and_variable(tmp_path: Path) -> None:
    interrupted_fit(tmp_path / "b")
    other = make_model(units=6)
    with pytest.raises(errors.IncompatibleCheckpointError) as info:
        other.fit(
            X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(tmp_path / "b")], verbose=0
        )
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(tmp_path / "b") in message and "dense" in message and "(4, 6)" in message
    # Nothing was lost: the backup is still there for the right model.
    assert any(n.startswith("ft-step-") for n in os.listdir(tmp_path / "b"))


def test_different_optimizer_is_refused(tmp_path: Path) -> None:
    interrupted_fit(tmp_path / "b")
    with pytest.raises(errors.IncompatibleCheckpointError, match="optimizer variables"):
        make_model(optimizer="sgd").fit(
            X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(tmp_path / "b")], verbose=0
        )


def _committed(backup_dir: Path) -> list[Path]:
    return sorted(p for p in backup_dir.iterdir() if p.name.startswith("ft-step-"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "flip-middle", "delete", "record"])
def test_damaged_backup_is_never_loaded_silently(damage: str, tmp_path: Path) -> None:
    interrupted_fit(tmp_path / "b")
    (backup,) = _committed(tmp_path / "b")
    if damage == "record":
        victim = backup / "ft-backup.json"
        victim.write_text(victim.read_text()[:40])
    else:
        victim = max(
            (p for p in (backup / "state").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size,
        )
        data = victim.read_bytes()
        if damage == "truncate":
            victim.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        elif damage == "flip-middle":  # inside a chunk: found by its crc32c as it is read
            middle = len(data) // 2
            victim.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
        else:
            victim.unlink()
    with pytest.raises(errors.CheckpointCorruptedError) as info:
        make_model().fit(
            X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(tmp_path / "b")], verbose=0
        )
    assert isinstance(info.value, OSError)
    assert str(backup) in str(info.value)
    # A damaged file the listing check finds is named; a flipped array byte
    # is found as the arrays are read, and the message names the array.
    where = victim if damage in ("truncate", "delete", "record") else backup / "state"
    assert str(where) in str(info.value)
    assert _committed(tmp_path / "b") == [backup]  # nothing older: nothing moved aside
    # The fit raised in on_train_begin, after locking: backup_dir is free again.
    assert posix_lock.holder(str(tmp_path / "b")) is None


def test_damaged_backup_falls_back_to_an_older_intact_one(tmp_path: Path) -> None:
    interrupted_fit(tmp_path / "b")
    (newest,) = _committed(tmp_path / "b")
    older = newest.with_name("ft-step-0000000002")
    import shutil

    shutil.copytree(newest, older)
    blob = max(
        (p for p in (newest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    blob.write_bytes(b"\0" * blob.stat().st_size)
    callback = ft.BackupAndRestore(tmp_path / "b")
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
    assert callback.restored is not None and callback.restored["path"] == str(older)


def test_unwritable_backup_dir_fails_before_any_training(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    counter = CountBatches()
    with pytest.raises(errors.BackupDirNotWritableError, match="not a writable directory") as info:
        make_model().fit(
            X,
            Y,
            batch_size=4,
            epochs=2,
            callbacks=[ft.BackupAndRestore(blocker / "sub"), counter],
            verbose=0,
        )
    assert isinstance(info.value, OSError)
    assert counter.batches == 0


def test_second_live_run_on_same_backup_dir_is_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ft.store import posix_lock; posix_lock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(tmp_path),
        ],
        env=engine_env("jax"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        counter = CountBatches()
        with pytest.raises(errors.BackupDirInUseError, match="in use by another live training run"):
            make_model().fit(
                X,
                Y,
                batch_size=4,
                epochs=1,
                callbacks=[ft.BackupAndRestore(tmp_path), counter],
                verbose=0,
            )
        assert counter.batches == 0
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone (even killed), the directory is usable again.
    make_model().fit(
        X, Y, batch_size=4, epochs=1, callbacks=[ft.BackupAndRestore(tmp_path)], verbose=0
    )


def test_fit_that_raises_frees_backup_dir_once_its_save_in_flight_commits(tmp_path: Path) -> None:
    callback = ft.BackupAndRestore(tmp_path, save_freq=2, async_save=True)
    gate = threading.Event()
    write = callback._store.write

    def held_write(record, arrays):  # the save of step 2 stays in flight until the gate opens
        gate.wait(60)
        return write(record, arrays)

    callback._store.write = held_write
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            make_model().fit(
                X, Y, batch_size=4, epochs=2, callbacks=[callback, Crash(5)], verbose=0
            )
        # The fit raised with a save in flight: the run still holds backup_dir ...
        assert posix_lock.holder(str(tmp_path)) is not None
        assert _committed(tmp_path) == []
    finally:
        gate.set()
    # ... until that save has committed; then another run may take it over.
    save_pipeline.for_directory(str(tmp_path)).wait(60)
    assert [p.name for p in _committed(tmp_path)] == ["ft-step-0000000002"]
    assert posix_lock.holder(str(tmp_path)) is None
    resumed = ft.BackupAndRestore(tmp_path)
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[resumed], verbose=0)
    assert resumed.restored is not None and resumed.restored["step"] == 2


def test_delete_checkpoint_removes_only_what_ft_wrote(tmp_path: Path) -> None:
    backup = tmp_path / "b"
    backup.mkdir()
    (backup / "notes.txt").write_text("mine")
    (backup / "ft-step-notes").mkdir()
    interrupted_fit(backup)
    make_model().fit(
        X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(backup)], verbose=0
    )
    assert sorted(os.listdir(backup)) == ["ft-step-notes", "notes.txt"]


def test_delete_checkpoint_removes_an_empty_backup_dir(tmp_path: Path) -> None:
    make_model().fit(
        X, Y, batch_size=4, epochs=2, callbacks=[ft.BackupAndRestore(tmp_path / "b")], verbose=0
    )
    assert not (tmp_path / "b").exists()


def test_delete_checkpoint_false_keeps_one_backup(tmp_path: Path) -> None:
    cb = ft.BackupAndRestore(tmp_path / "b", save_freq=1, delete_checkpoint=False)
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[cb], verbose=0)
    assert [p.name for p in _committed(tmp_path / "b")] == ["ft-step-0000000016"]
    again = ft.BackupAndRestore(tmp_path / "b")
    history = make_model().fit(X, Y, batch_size=4, epochs=3, callbacks=[again], verbose=0)
    assert again.restored is not None and again.restored["epoch"] == 2
    assert len(history.history["loss"]) == 1


def test_leftovers_of_an_interrupted_save_are_removed(tmp_path: Path) -> None:
    backup = tmp_path / "b"
    backup.mkdir()
    (backup / ".ft-tmp-7-deadbeef").mkdir()
    (backup / ".ft-tmp-7-deadbeef" / "partial").write_bytes(b"x")
    cb = ft.BackupAndRestore(backup, delete_checkpoint=False)
    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[cb], verbose=0)
    assert cb.restored is None
    assert sorted(os.listdir(backup)) == [".ft-lock", "ft-step-0000000008"]


def test_whole_state_round_trips_exactly(tmp_path: Path) -> None:
    """Every variable group, `iterations` included, comes back bit for bit."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    model.compile("adam", "mse", metrics=["mae"])
    model.fit(
        X,
        Y,
        batch_size=4,
        epochs=1,
        verbose=0,
        callbacks=[ft.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)],
    )
    saved = [
        np.array(v.numpy() if hasattr(v, "numpy") else v)
        for v in model.variables + model.optimizer.variables
    ]
    fresh = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(1),
        ]
    )
    fresh.compile("adam", "mse", metrics=["mae"])
    cb = ft.BackupAndRestore(tmp_path / "b", delete_checkpoint=False)
    fresh.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[cb])  # restores, runs 0 epochs
    assert cb.restored is not None and cb.restored["epoch"] == 1
    restored = [
        np.array(keras.ops.convert_to_numpy(v)) for v in fresh.variables + fresh.optimizer.variables
    ]
    assert int(fresh.optimizer.iterations) == 8
    assert any("seed_generator" in v.path for v in fresh.variables)
    assert any("moving_variance" in v.path for v in fresh.variables)
    for a, b in zip(saved, restored, strict=True):
        np.testing.assert_array_equal(a, b)


def test_async_save_commits_before_fit_returns(tmp_path: Path) -> None:
    callback = ft.BackupAndRestore(
        tmp_path / "b", save_freq=1, delete_checkpoint=False, async_save=True
    )
    make_model().fit(X, Y, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
    assert sorted(os.listdir(tmp_path / "b")) == [".ft-lock", "ft-step-0000000016"]


def test_background_save_error_is_never_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ft.checkpoint_store import CheckpointStore

    original = CheckpointStore._commit
    calls = {"n": 0}

    def failing_commit(self, tmp, final, record):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device (injected)")
        return original(self, tmp, final, record)

    class WaitForSave(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            # Each save finishes before the next step, so none is moved: the
            # save after the failed one must raise its error.
            for thread in threading.enumerate():
                if thread.name == "ft-save-pipeline":
                    thread.join(60)

    monkeypatch.setattr(CheckpointStore, "_commit", failing_commit)
    callback = ft.BackupAndRestore(tmp_path / "b", save_freq=1, async_save=True)
    counter = CountBatches()
    with pytest.raises(OSError, match="No space left on device"):
        make_model().fit(
            X,
            Y,
            batch_size=4,
            epochs=2,
            callbacks=[callback, counter, WaitForSave()],
            verbose=0,
        )
    # Raised by the save after step 3, before the counter (listed after ft) sees it.
    assert counter.batches == 2, "the error surfaced at the next save, not later"
    # The step-1 backup committed before the failure is still there.
    assert "ft-step-0000000001" in os.listdir(tmp_path / "b")


def test_invalid_async_save_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid value for argument `async_save`"):
        ft.BackupAndRestore(tmp_path, async_save="yes")


# ----------------------------------------------- deletion at fit's end, off the thread


def test_delete_checkpoint_leaves_nothing_under_backup_dir_when_fit_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bytes go on a background thread (slowed here); the backups are gone at once."""
    import shutil

    from ft.store import background_removal

    removing = threading.Event()
    release = threading.Event()
    rmtree = shutil.rmtree

    def slow_rmtree(path: str, *args: object, **kwargs: object) -> None:
        if os.path.basename(path).startswith(".ft-trash-b-"):  # the backup_dir moved aside
            removing.set()
            release.wait(30)
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    backup = tmp_path / "work" / "b"
    backup.parent.mkdir()
    make_model().fit(
        X,
        Y,
        batch_size=4,
        epochs=2,
        callbacks=[ft.BackupAndRestore(backup, save_freq=3)],
        verbose=0,
    )
    assert not backup.exists()
    monkeypatch.setattr(shutil, "rmtree", slow_rmtree)
    make_model().fit(
        X,
        Y,
        batch_size=4,
        epochs=2,
        callbacks=[ft.BackupAndRestore(backup, save_freq=3)],
        verbose=0,
    )
    assert removing.wait(30)
    assert not backup.exists()  # fit returned while the removal waits
    (aside,) = list(backup.parent.iterdir())
    assert aside.name.startswith(".ft-trash-b-")
    # A new run in the same backup_dir meanwhile starts fresh and clean.
    callback = ft.BackupAndRestore(backup, save_freq=3, delete_checkpoint=False)
    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    assert callback.restored is None
    release.set()
    assert background_removal.wait(30)
    assert sorted(p.name for p in backup.parent.iterdir()) == ["b"]
    assert sorted(os.listdir(backup)) == [".ft-lock", "ft-step-0000000008"]


def test_trash_of_a_run_killed_while_deleting_is_removed_by_the_next(tmp_path: Path) -> None:
    backup = tmp_path / "b"
    left = tmp_path / ".ft-trash-b-0123456789ab"  # as `delete` renames a backup_dir aside
    (left / "ft-step-0000000004").mkdir(parents=True)
    others = [tmp_path / ".ft-trash-bb-0123456789ab", tmp_path / ".ft-trash-b-x-0123456789ab"]
    for other in others:  # other backup_dirs' (bb, b-x): not this run's
        other.mkdir()
    callback = ft.BackupAndRestore(backup, save_freq=3, delete_checkpoint=False)
    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[callback], verbose=0)
    assert not left.exists() and all(other.exists() for other in others)


def test_the_interpreter_waits_for_the_removal_at_exit(tmp_path: Path) -> None:
    script = f"""
import shutil, time
import numpy as np, keras, ft
rmtree = shutil.rmtree
def slow(path, *a, **k):
    if ".ft-trash-" in str(path):
        time.sleep(2)
    rmtree(path, *a, **k)
shutil.rmtree = slow
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile("sgd", "mse")
x = np.ones((16, 4), "float32")
model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0,
          callbacks=[ft.BackupAndRestore({str(tmp_path / "b")!r}, save_freq=2)])
print("FIT RETURNED", flush=True)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=engine_env(keras.backend.backend()),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0 and "FIT RETURNED" in proc.stdout, proc.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []
