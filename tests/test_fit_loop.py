"""Canaries for the Keras internals that ft.fit_loop relies on, and its run-time guards.

Each canary drives a real `model.fit`. They run in-process on this process's
backend and, through `test_canaries_pass_on_the_other_backend`, on the other
one. CI also runs the `keras_compat` ones against keras-nightly and the oldest
Keras that pyproject.toml allows. If one fails after a Keras upgrade,
mid-epoch resume needs a new hook (or Keras gained an initial step of its own,
which ft should use instead).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import ft
from ft import errors, fit_loop
from tests.helpers import ROOT, engine_env


def _model() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    return model


def _data(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(2 * n, dtype="float32").reshape(n, 2), np.zeros((n, 1), "float32")


class Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs: Any = None) -> None:
        self.iterator = fit_loop.find_epoch_iterator(self.model)


class Seen(keras.callbacks.Callback):
    """(epoch, batch) of every batch `fit` runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.seen.append((self.epoch, batch))


class SkipOnce(keras.callbacks.Callback):
    """Makes epoch 0 start at batch 3, as a resume does."""

    def on_train_begin(self, logs: Any = None) -> None:
        self.iterator = fit_loop.require_epoch_iterator(self.model)

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        if epoch == 0:
            fit_loop.start_next_epoch_at(self.iterator, batch=3, position=3)


@pytest.mark.keras_compat
def test_fit_exposes_its_epoch_iterator_and_the_attributes_ft_uses() -> None:
    probe = Probe()
    x, y = _data(8)
    _model().fit(x, y, batch_size=2, epochs=1, callbacks=[probe], verbose=0)
    it = probe.iterator
    assert it is not None, f"Keras {keras.version()}: fit no longer has a local `epoch_iterator`"
    for name in fit_loop.ITERATOR_ATTRIBUTES:
        assert hasattr(it, name), f"Keras {keras.version()}: EpochIterator lost `{name}`"


@pytest.mark.keras_compat
def test_keras_still_has_no_initial_step() -> None:
    import inspect

    params = inspect.signature(keras.Model.fit).parameters
    assert "initial_step" not in params, "Keras gained `initial_step`: use it in ft.fit_loop"


@pytest.mark.keras_compat
def test_start_next_epoch_at_skips_batches_of_one_epoch_only() -> None:
    seen = Seen()
    x, y = _data()
    _model().fit(x, y, batch_size=2, epochs=2, callbacks=[SkipOnce(), seen], verbose=0)
    assert seen.seen == [(0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]


@pytest.mark.keras_compat
def test_skip_of_an_input_of_unknown_length_lasts_one_epoch() -> None:
    """fit stops drawing from such an input on an exception, leaving the skipping
    generator open; the next epoch must still start at batch 0."""
    tf = pytest.importorskip("tensorflow")
    x, y = _data()
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda a, b: True).batch(2)
    seen = Seen()
    _model().fit(data, epochs=3, callbacks=[SkipOnce(), seen], verbose=0)
    trained = [s for s in seen.seen if s[1] < 5]  # Keras also begins a 6th step that finds no data
    assert trained == [(0, 3), (0, 4)] + [(e, b) for e in (1, 2) for b in range(5)]


# ----------------------------------------------------- run-time guards


class StopAfter(keras.callbacks.Callback):
    """Raises `RuntimeError("stop")` in `on_train_batch_end` of batch `batch`."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        if batch == self.batch:
            raise RuntimeError("stop")


def _interrupted_backup(tmp_path: Path) -> None:
    """A backup of epoch 0, batch 2 (of 5) in tmp_path."""
    x, y = _data()

    with pytest.raises(RuntimeError, match="stop"):
        _model().fit(
            x,
            y,
            batch_size=2,
            epochs=2,
            callbacks=[ft.BackupAndRestore(tmp_path, save_freq=2), StopAfter(2)],
            verbose=0,
        )


def _resume(tmp_path: Path) -> None:
    x, y = _data()
    _model().fit(
        x,
        y,
        batch_size=2,
        epochs=2,
        callbacks=[ft.BackupAndRestore(tmp_path, save_freq=2)],
        verbose=0,
    )


@pytest.mark.keras_compat
def test_a_fit_interrupted_mid_epoch_resumes_at_its_batch(tmp_path: Path) -> None:
    _interrupted_backup(tmp_path)
    seen = Seen()
    backup = ft.BackupAndRestore(tmp_path, save_freq=2)
    x, y = _data()
    _model().fit(x, y, batch_size=2, epochs=2, callbacks=[backup, seen], verbose=0)
    assert backup.restored is not None and backup.restored["batch"] == 2
    assert seen.seen == [(0, 2), (0, 3), (0, 4)] + [(1, b) for b in range(5)]


@pytest.mark.keras_compat
def test_ft_has_no_batch_end_hook_that_would_make_keras_wait_for_every_step() -> None:
    """Keras converts every step's logs to Python floats (a device sync) before it
    calls a callback whose `on_train_batch_end` is not its default; ft's is."""
    from keras.src.utils.python_utils import is_default

    assert is_default(keras.callbacks.Callback().on_train_batch_end)
    assert is_default(ft.BackupAndRestore("/tmp/unused").on_train_batch_end)


@pytest.mark.keras_compat
def test_a_save_is_taken_before_any_callback_hears_of_its_step(tmp_path: Path) -> None:
    """A callback listed before ft that raises in `on_train_batch_end` of a step
    whose save is due: the backup of that step exists."""
    x, y = _data()

    with pytest.raises(RuntimeError, match="stop"):
        _model().fit(
            x,
            y,
            batch_size=2,
            epochs=2,
            callbacks=[StopAfter(3), ft.BackupAndRestore(tmp_path, save_freq=4)],
            verbose=0,
        )
    backup = ft.BackupAndRestore(tmp_path, save_freq=4)
    _model().fit(x, y, batch_size=2, epochs=2, callbacks=[backup], verbose=0)
    assert backup.restored is not None and backup.restored["step"] == 4


def test_a_fit_that_skips_its_batch_end_hooks_is_an_error_not_a_silent_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if Keras stopped calling its `CallbackList.on_train_batch_end` after a step."""
    monkeypatch.setattr(fit_loop, "at_each_step_end", lambda model, on_step_end: lambda: None)
    with pytest.raises(errors.IncompatibleKerasError, match="on_train_batch_end") as raised:
        _resume(tmp_path)
    assert keras.version() in str(raised.value)


def test_missing_epoch_iterator_is_an_error_naming_the_keras_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _interrupted_backup(tmp_path)
    monkeypatch.setattr(fit_loop, "find_epoch_iterator", lambda model: None)
    with pytest.raises(errors.IncompatibleKerasError, match=f"Keras {keras.version()}"):
        _resume(tmp_path)


def test_a_fit_that_bypasses_the_skip_is_an_error_not_a_replay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if Keras stopped drawing batches through `_enumerate_iterator`."""
    _interrupted_backup(tmp_path)
    monkeypatch.setattr(fit_loop, "start_next_epoch_at", lambda *a, **k: None)
    with pytest.raises(errors.IncompatibleKerasError, match="began at batch 0") as raised:
        _resume(tmp_path)
    assert keras.version() in str(raised.value)


def test_an_iterator_that_miscounts_its_steps_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if `_steps_seen` no longer counted the batches drawn."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    _interrupted_backup(tmp_path)
    original = EpochIterator._enumerate_iterator

    def miscounting(self: Any) -> Any:
        for step in original(self):
            self._steps_seen = 0
            yield step

    monkeypatch.setattr(EpochIterator, "_enumerate_iterator", miscounting)
    with pytest.raises(errors.IncompatibleKerasError, match="_steps_seen"):
        _resume(tmp_path)


def test_steps_that_skip_the_saved_batch_are_an_error(tmp_path: Path) -> None:
    """A backup of batch 3 resumed with steps_per_execution=2 (steps 0-1, 2-3, ...)."""
    x, y = _data()

    with pytest.raises(RuntimeError, match="stop"):
        _model().fit(
            x,
            y,
            batch_size=2,
            epochs=2,
            callbacks=[ft.BackupAndRestore(tmp_path, save_freq=3), StopAfter(3)],
            verbose=0,
        )
    model = _model()
    model.compile("sgd", "mse", steps_per_execution=2)
    with pytest.raises(errors.UnsupportedConfigurationError, match="steps_per_execution"):
        model.fit(
            x,
            y,
            batch_size=2,
            epochs=2,
            callbacks=[ft.BackupAndRestore(tmp_path, save_freq=3)],
            verbose=0,
        )


def test_canaries_pass_on_the_other_backend() -> None:
    """The `keras_compat` canaries, driven by a real fit on the backend this process is not."""
    other = "tensorflow" if keras.backend.backend() == "jax" else "jax"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-m",
            "keras_compat",
            str(Path(__file__)),
        ],
        env=engine_env(other, PYTEST_ADDOPTS=""),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.keras_compat
def test_host_random_state_round_trips_through_json() -> None:
    """NumPy's, Python's and Keras's global generators come back as they were."""
    import json
    import random

    from ft import host_rng

    float(keras.random.uniform(()))  # creates Keras's global seed generator
    state = json.loads(json.dumps(host_rng.capture()))
    first = (random.random(), float(np.random.random()), float(keras.random.uniform(())))
    host_rng.restore(state)
    again = (random.random(), float(np.random.random()), float(keras.random.uniform(())))
    assert again == first
    # A record of an older ft holds NumPy's state alone.
    host_rng.restore(state["numpy"])
    assert float(np.random.random()) == first[1]
