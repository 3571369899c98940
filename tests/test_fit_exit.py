"""What ft installs for one fit is undone however the fit ends (issue 11, point 5)."""

from __future__ import annotations

import gc
import signal
from pathlib import Path

import keras
import numpy as np
import pytest

import ft
from ft import fit_exit


class Raise(keras.callbacks.Callback):
    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook

    def _maybe(self, hook: str) -> None:
        if hook == self.hook:
            raise RuntimeError(f"raised in {hook}")

    def on_epoch_begin(self, epoch, logs=None):
        self._maybe("on_epoch_begin")

    def on_train_batch_begin(self, batch, logs=None):
        self._maybe("on_train_batch_begin")

    def on_train_batch_end(self, batch, logs=None):
        if batch == 2:
            self._maybe("on_train_batch_end")

    def on_epoch_end(self, epoch, logs=None):
        self._maybe("on_epoch_end")

    def on_test_batch_end(self, batch, logs=None):
        self._maybe("validation")


def _model() -> keras.Model:
    model = keras.Sequential([keras.layers.Input((4,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    return model


def _handler_marker(signum, frame):  # a handler of the user's own, to be restored
    raise AssertionError("not called")


HOOKS = ["on_epoch_begin", "on_train_batch_begin", "on_train_batch_end", "on_epoch_end"]


@pytest.mark.parametrize("hook", [*HOOKS, "validation"])
def test_sigterm_handler_is_restored_when_fit_raises(hook: str, tmp_path: Path) -> None:
    previous = signal.signal(signal.SIGTERM, _handler_marker)
    try:
        model = _model()
        x, y = np.ones((32, 4), "float32"), np.ones((32, 1), "float32")
        callback = ft.BackupAndRestore(tmp_path / "b", save_freq=4, save_before_preemption=True)
        with pytest.raises(RuntimeError, match=f"raised in {hook}") as raised:
            model.fit(
                x,
                y,
                batch_size=4,
                epochs=2,
                validation_data=(x, y),
                callbacks=[callback, Raise(hook)],
                verbose=0,
            )
        if hook == "validation":
            # Raised outside every hook ft wraps: undone once fit's frame is gone.
            del raised
            gc.collect()
        assert signal.getsignal(signal.SIGTERM) is _handler_marker
        assert model._initial_epoch is None
        # The same callback trains again, and undoes its hooks when that fit completes.
        history = model.fit(x, y, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
        assert len(history.history["loss"]) >= 1
        assert signal.getsignal(signal.SIGTERM) is _handler_marker
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_cleanup_left_behind_runs_at_the_next_fit_begin() -> None:
    runs: list[str] = []
    left = fit_exit.on_fit_exit(object(), lambda: runs.append("left"))  # no fit on the stack
    assert not left.done and runs == []
    again = fit_exit.on_fit_exit(object(), lambda: runs.append("again"))
    assert left.done and runs == ["left"]
    again()
    again()
    assert runs == ["left", "again"]
