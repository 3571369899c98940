"""Background saves: the snapshot, the in-flight policy, bounded waits, the benchmark.

Runs real `model.fit` on the test process's backend; the checks that need both
backends (or a GPU's code path on the CPU) run in processes of their own.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import ft
from ft import errors
from ft.checkpoint_store import CheckpointStore
from ft.snapshot import Snapshotter
from tests.helpers import ROOT, engine_env

X = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
Y = X.sum(axis=1, keepdims=True)


def make_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(1)])
    model.compile(optimizer="adam", loss="mse")
    return model


def held_writes(monkeypatch: pytest.MonkeyPatch, release: threading.Event) -> list[int]:
    """Make every backup write wait for `release`; returns the steps written, in order."""
    original = CheckpointStore.write
    steps: list[int] = []

    def write(self: CheckpointStore, record: Any, arrays: Any) -> str:
        release.wait(120)
        steps.append(record.step)
        return original(self, record, arrays)

    monkeypatch.setattr(CheckpointStore, "write", write)
    return steps


@pytest.mark.parametrize("path", ["host", "device", "device-sharded"])
def test_snapshot_is_a_copy_not_a_view(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "device-sharded" and keras.backend.backend() != "jax":
        pytest.skip("JAX multi-host's path")
    if path == "device":
        if keras.backend.backend() != "jax":
            pytest.skip("the device path is JAX's")
        from ft import snapshot

        # The GPU/TPU path, on the CPU: a jitted copy not waited for, then the
        # training steps that donate the live buffers, then pinned_host.
        monkeypatch.setattr(snapshot, "_on_accelerator", lambda values: True)
    model = make_model()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    variables = {"model": list(model.trainable_variables), "optimizer": [], "metrics": []}
    before = [np.array(keras.ops.convert_to_numpy(v)) for v in variables["model"]]
    snapshotter = Snapshotter()
    # JAX multi-host's snapshot (global arrays kept on their shardings), on one process.
    taken_now = snapshotter.take_sharded if path == "device-sharded" else snapshotter.take
    snapshot = taken_now(variables)
    assert snapshot is not None
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)  # donates and updates every variable
    taken = [np.asarray(a) for a in snapshot.host()["model"]]
    assert snapshotter.last_where == path
    for a, b in zip(before, taken, strict=True):
        np.testing.assert_array_equal(a, b)
    after = [np.array(keras.ops.convert_to_numpy(v)) for v in variables["model"]]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the device path is JAX's")
def test_a_device_copy_that_is_the_live_buffer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from ft import snapshot

    # A JAX whose jitted copy handed back its input would let a background save
    # read buffers the next step overwrites: ft checks the first snapshot.
    monkeypatch.setattr(snapshot, "_copy_keeping", lambda shardings: lambda values: values)
    model = make_model()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    variables = {"model": list(model.trainable_variables), "optimizer": [], "metrics": []}
    with pytest.raises(errors.IncompatibleEngineError, match=r"jax \d+\.\d+.*async_save=False"):
        Snapshotter().take_sharded(variables)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the device path is JAX's")
def test_without_room_on_the_device_the_snapshot_copies_to_host_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from ft import snapshot

    def no_room() -> Any:
        def copy(values: list[Any]) -> list[Any]:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

        return copy

    monkeypatch.setattr(snapshot, "_on_accelerator", lambda values: True)
    monkeypatch.setattr(snapshot, "_copy_all", no_room)
    model = make_model()
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    variables = {"model": list(model.trainable_variables), "optimizer": [], "metrics": []}
    expected = [np.array(keras.ops.convert_to_numpy(v)) for v in variables["model"]]
    snapshotter = Snapshotter()
    ft_logger = logging.getLogger("ft")
    ft_logger.addHandler(caplog.handler)  # ft's logger does not propagate to the root
    try:
        first = snapshotter.take(variables)
        snapshotter.take(variables)
    finally:
        ft_logger.removeHandler(caplog.handler)
    assert snapshotter.last_where == "host-chunked"
    for a, b in zip(expected, first.host()["model"], strict=True):
        np.testing.assert_array_equal(a, b)
    said = [r for r in caplog.records if "no room for a second copy" in r.getMessage()]
    assert len(said) == 1


def test_saves_due_while_one_is_in_flight_move_and_training_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    written = held_writes(monkeypatch, release)

    class Release(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 9:
                release.set()  # training ran 8 steps past the held save of step 2

    callback = ft.BackupAndRestore(
        tmp_path / "b", save_freq=2, delete_checkpoint=False, async_save=True
    )
    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[callback, Release()], verbose=0)
    stats = callback.stats
    assert written[0] == 2
    assert stats.moved_saves >= 1 and stats.moved_steps >= 1
    assert stats.commits == len(written)
    # The last save (due at step 16, or moved past it) is committed before fit returns.
    assert written[-1] == 16
    assert (tmp_path / "b" / "ft-step-0000000016").is_dir()


def test_a_due_save_waits_for_the_device_only_while_the_last_is_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keras does not wait for each step's logs: under JAX the training thread can be
    steps ahead of the device, so whether a due save must move is decided after the
    device has caught up, and only then (no wait at all while nothing is due)."""
    from ft import training_state

    release = threading.Event()
    written = held_writes(monkeypatch, release)
    callback = ft.BackupAndRestore(
        tmp_path / "b", save_freq=2, delete_checkpoint=False, async_save=True
    )
    waits: list[tuple[int, bool]] = []
    monkeypatch.setattr(
        training_state,
        "wait_for_device",
        lambda model: waits.append((callback._schedule.step, callback._pipeline.busy())),
    )

    class Release(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 9:
                release.set()

    make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[callback, Release()], verbose=0)
    # The save of step 2 is held until step 10: the save due at step 4 waits for it,
    # with a wait for the device at each step from 4 until it is taken.
    steps = [step for step, _ in waits]
    assert steps[:6] == [4, 5, 6, 7, 8, 9], waits
    assert all(busy for _, busy in waits)
    assert written[0] == 2 and callback.stats.moved_saves >= 1


def test_a_save_due_at_fits_end_is_not_written_when_the_backups_are_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    written = held_writes(monkeypatch, release)

    class Release(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            if batch == 15:  # the last step: its save, due, has just moved
                release.set()

    callback = ft.BackupAndRestore(tmp_path / "b", save_freq=2, async_save=True)
    ft_logger = logging.getLogger("ft")
    ft_logger.addHandler(caplog.handler)
    try:
        make_model().fit(X, Y, batch_size=4, epochs=1, callbacks=[callback, Release()], verbose=0)
    finally:
        ft_logger.removeHandler(caplog.handler)
    # Only the save in flight (step 2) was written, and waited for; the one
    # moved past step 16 would have been deleted at once, so it was not made.
    assert written == [2]
    assert callback.stats.commits == 1
    assert not list((tmp_path / "b").glob("ft-step-*"))
    # It came due at step 4 and moved (one was in flight) to past the end: counted.
    assert (callback.stats.moved_saves, callback.stats.moved_steps) == (1, 12)
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit done")]
    assert len(ends) == 1 and "the save due at fit's end was not written" in ends[0]
    assert "saves moved because one was in flight: 1 (by 12 steps in all)" in ends[0]


def test_end_of_fit_wait_is_bounded_by_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    held_writes(monkeypatch, release)
    callback = ft.BackupAndRestore(tmp_path / "b", save_freq=4, async_save=True, timeout=0.5)
    try:
        with pytest.raises(
            errors.SaveTimeoutError, match=r"timeout=0.5 s for the backup of step 4 to"
        ):
            make_model().fit(X, Y, batch_size=16, epochs=1, callbacks=[callback], verbose=0)
    finally:
        release.set()
    callback._pipeline.wait(60)  # the held save still commits once released
    assert (tmp_path / "b" / "ft-step-0000000004").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "tensorflow"])
def test_save_overlapping_training_captures_its_step_bit_for_bit(
    backend: str, tmp_path: Path
) -> None:
    """Also: a mid-epoch interrupted run ends bit-identical to an uninterrupted one."""
    out = tmp_path / "exactness.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "exactness_check.py"),
            "--width",
            "16",
            "--out",
            str(out),
        ],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    assert result["overlap"]["bit_identical"] and result["overlap"]["restored_step"] == 5
    assert result["interrupted_vs_uninterrupted"]["bit_identical"]


def run_benchmark(script: str, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `benchmarks/<script>` under JAX, its scratch files in `out`; it must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=engine_env("jax", FT_BENCH_DIR=str(out)),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_multihost_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    proc = run_benchmark(
        "multihost_overhead.py",
        tmp_path,
        *("--width", "32", "--layers", "1", "--steps", "8", "--every", "4", "--repeats", "1"),
        *("--out", str(tmp_path)),
    )
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == [
        "raw floor",
        "ft synchronous",
        "ft background",
        "keras OrbaxCheckpoint",
    ]
    assert all(" s | " in row for row in rows), rows  # each callback ran
    workers = json.loads((tmp_path / "benchmark-multihost.json").read_text())
    assert len(workers) == 2 and all(w["saves_per_fit"] == 2 for w in workers)
    assert "ft restore" in proc.stdout
    assert not list(tmp_path.glob("ft-multihost-*"))  # it cleans up


@pytest.mark.slow
def test_benchmark_gpu_mode_runs_at_a_tiny_size(tmp_path: Path) -> None:
    run_benchmark(
        "checkpoint_overhead.py",
        tmp_path,
        *("--mode", "gpu", "--sizes", "tiny", "--saves", "1", "--out", str(tmp_path)),
    )
    (result,) = json.loads((tmp_path / "benchmark-gpu.json").read_text())
    assert set(result["modes"]) == {"close", "spaced"}
    for mode in result["modes"].values():
        assert set(mode["runs"]) >= {"baseline", "raw_floor", "ft", "keras_backup_and_restore"}
        assert mode["runs"]["ft"][0]["commits"] >= 1
    assert result["restore"]["ft_restore"][0] > 0
    table = (tmp_path / "benchmark-gpu.md").read_text()
    assert "keras_orbax_checkpoint" in table and "ft / cold read" in table


def test_benchmark_runs_the_modes_asked_for_with_their_restore_samples(tmp_path: Path) -> None:
    # What a short GPU lease runs: one mode, a few restore samples (benchmarks/gpu_check.sh).
    run_benchmark(
        "checkpoint_overhead.py",
        tmp_path,
        *("--mode", "gpu", "--sizes", "tiny", "--saves", "2", "--modes", "spaced"),
        *("--restores", "2", "--out", str(tmp_path)),
    )
    (result,) = json.loads((tmp_path / "benchmark-gpu.json").read_text())
    assert set(result["modes"]) == {"spaced"}
    ft_run = result["modes"]["spaced"]["runs"]["ft"][0]
    assert len(result["restore"]["ft_restore"]) == 2
    # The table says how many of the saves that came due were written.
    table = (tmp_path / "benchmark-gpu.md").read_text()
    assert f"), {ft_run['commits']} of 2 |" in table
    # A run cut short before its restores (kept from FT_BENCH_PARTIAL) still tabulates.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from checkpoint_overhead import tables
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    del result["restore"]
    assert "| jax | tiny | not measured |" in tables([result])


def test_host_contention_benchmark_runs_at_a_tiny_size(tmp_path: Path) -> None:
    proc = run_benchmark("host_contention.py", tmp_path, "--mb", "8", "--samples", "1")
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    names = [row.split(" | ")[0].strip("| ") for row in rows]
    assert names[:5] == [
        "raw write",
        "ft store write",
        "orbax write",
        "crc32c ft",
        "crc32c google extend",
    ]
    assert "ft's crc32c releases the GIL here: True" in proc.stdout
    assert not list(tmp_path.glob("ft-contention-*"))  # it cleans up


def test_background_error_is_chained_to_the_exception_that_ends_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_write(self: CheckpointStore, record: Any, arrays: Any) -> str:
        raise OSError(28, "No space left on device (injected)")

    class FailAfterSave(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            for thread in threading.enumerate():  # the save of step 1 has failed
                if thread.name == "ft-save-pipeline":
                    thread.join(60)
            raise RuntimeError("interrupted")

    monkeypatch.setattr(CheckpointStore, "write", failing_write)
    callback = ft.BackupAndRestore(tmp_path / "b", save_freq=1, async_save=True)
    with pytest.raises(RuntimeError, match="interrupted") as raised:
        make_model().fit(X, Y, batch_size=16, epochs=1, callbacks=[callback, FailAfterSave()])
    context = raised.value.__context__
    assert isinstance(context, OSError) and "No space left" in str(context)
    if sys.version_info >= (3, 11):
        assert any("background save" in note for note in raised.value.__notes__)
