"""Canaries for the Keras internals that ft.fit_loop relies on.

If one of these fails after a Keras upgrade, mid-epoch resume needs a new hook
(or Keras gained an initial step of its own, which ft should use instead).
"""

from __future__ import annotations

import keras
import numpy as np

from ft import fit_loop


class Probe(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.iterator = fit_loop.find_epoch_iterator(self.model)


def test_fit_exposes_its_epoch_iterator_and_the_attributes_ft_uses() -> None:
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    probe = Probe()
    model.fit(
        np.zeros((8, 2)), np.zeros((8, 1)), batch_size=2, epochs=1, callbacks=[probe], verbose=0
    )
    it = probe.iterator
    assert it is not None, "fit no longer has a local `epoch_iterator`"
    for name in (
        "_enumerate_iterator",
        "_steps_seen",
        "_current_iterator",
        "_num_batches",
        "steps_per_epoch",
        "steps_per_execution",
        "num_batches",
    ):
        assert hasattr(it, name), f"EpochIterator lost `{name}`"


def test_keras_still_has_no_initial_step() -> None:
    import inspect

    params = inspect.signature(keras.Model.fit).parameters
    assert "initial_step" not in params, "Keras gained `initial_step`: use it in ft.fit_loop"


def test_start_next_epoch_at_skips_batches_once() -> None:
    seen: list[tuple[int, int]] = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch
            if epoch == 0:
                fit_loop.start_next_epoch_at(fit_loop_iterator[0], batch=3, position=3)

        def on_train_batch_begin(self, batch, logs=None):
            seen.append((self.epoch, batch))

    fit_loop_iterator: list = []

    class Grab(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            fit_loop_iterator.append(fit_loop.find_epoch_iterator(self.model))

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(
        np.zeros((10, 2)),
        np.zeros((10, 1)),
        batch_size=2,
        epochs=2,
        callbacks=[Grab(), Record()],
        verbose=0,
    )
    assert seen == [(0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4)]
