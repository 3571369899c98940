"""A multi-worker digits classifier with ft.BackupAndRestore, on TensorFlow or JAX.

    KERAS_BACKEND=tensorflow python -m ft.launch -n 2 multiworker_examples/digits_classifier.py
    KERAS_BACKEND=jax        python -m ft.launch -n 2 multiworker_examples/digits_classifier.py

Trains on scikit-learn's digits (shipped with the package, nothing is
downloaded). `ft.strategies.auto()` gives a MultiWorkerMirroredStrategy under
TensorFlow and `jax.distributed` + DataParallel under JAX. Under TensorFlow
every worker passes the whole dataset and tf.distribute shards it; under JAX
each process passes its share of every global batch. Rerun the same command
after a crash and training resumes at the saved epoch and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import ft

GLOBAL_BATCH, TRAIN, TEST = 60, 1500, 240


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    return x[:TRAIN], y[:TRAIN], x[TRAIN : TRAIN + TEST], y[TRAIN : TRAIN + TEST]


def my_share(a: np.ndarray, index: int, count: int) -> np.ndarray:
    """Process `index`'s slice of every global batch (JAX: each process feeds its own)."""
    per = GLOBAL_BATCH // count
    batches = a.reshape(-1, GLOBAL_BATCH, *a.shape[1:])
    return batches[:, index * per : (index + 1) * per].reshape(-1, *a.shape[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backup-dir", default="/tmp/ft-digits-backup")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--save-freq", type=int, default=5, help="batches between backups")
    parser.add_argument("--no-backup", action="store_true", help="train without ft")
    parser.add_argument("--kill-at-step", type=int, help="worker 1 SIGKILLs itself there, once")
    parser.add_argument(
        "--sigterm-at-step", type=int, help="worker 1 gets SIGTERM there, once (preemption)"
    )
    parser.add_argument("--result", help="write the final test accuracy and weights here (JSON)")
    args = parser.parse_args()

    index = int(os.environ.get("FT_PROCESS_INDEX", "0"))
    x, y, x_test, y_test = load_data()
    strategy = ft.strategies.auto(seed=42)
    batch = GLOBAL_BATCH
    if keras.backend.backend() == "jax":
        import jax

        count, index = jax.process_count(), jax.process_index()
        if count > 1:
            x, y = my_share(x, index, count), my_share(y, index, count)
            x_test, y_test = my_share(x_test, index, count), my_share(y_test, index, count)
            batch = GLOBAL_BATCH // count
    else:
        keras.utils.set_random_seed(42)

    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((64,)),
                keras.layers.Dense(64, activation="relu", name="hidden"),
                keras.layers.Dropout(0.2, name="dropout"),
                keras.layers.Dense(10, activation="softmax", name="classes"),
            ],
            name="digits",
        )
        model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])

    callbacks: list[keras.callbacks.Callback] = []
    if not args.no_backup:
        callbacks.append(
            ft.BackupAndRestore(
                args.backup_dir, save_freq=args.save_freq, save_before_preemption=True
            )
        )
    first_launch = os.environ.get("FT_RESTART_COUNT", "0") == "0"
    if index == 1 and first_launch:
        if args.kill_at_step:
            callbacks.append(_Fault(args.kill_at_step, signal.SIGKILL))
        if args.sigterm_at_step:
            callbacks.append(_Fault(args.sigterm_at_step, signal.SIGTERM))
    model.fit(x, y, batch_size=batch, epochs=args.epochs, callbacks=callbacks, verbose=0)
    _, accuracy = model.evaluate(x_test, y_test, batch_size=batch, verbose=0)
    print(f"test accuracy {accuracy:.4f}", flush=True)
    if args.result:
        weights = [np.asarray(v).tolist() for v in _host_weights(model)]
        with open(f"{args.result}.{index}", "w") as f:
            json.dump({"accuracy": float(accuracy), "weights": weights}, f)


class _Fault(keras.callbacks.Callback):
    """Sends `signum` to this process after global step `at_step`."""

    def __init__(self, at_step: int, signum: int) -> None:
        super().__init__()
        self.at_step, self.signum, self.step, self.epoch = at_step, signum, 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step == self.at_step:
            name = signal.Signals(self.signum).name
            print(f"{name} to myself at epoch {self.epoch}, batch {batch}", flush=True)
            os.kill(os.getpid(), self.signum)


def _host_weights(model: keras.Model) -> list:
    values = [v.value for v in model.weights]
    if keras.backend.backend() == "jax":
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return [multihost_utils.process_allgather(v, tiled=True) for v in values]
    return [keras.ops.convert_to_numpy(v) for v in values]


if __name__ == "__main__":
    main()
