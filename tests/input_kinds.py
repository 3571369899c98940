"""Interrupt a real `fit` mid-epoch and resume it, for every kind of input `fit` takes.

    KERAS_BACKEND=tensorflow python tests/input_kinds.py --out DIR [KIND[@POINT] ...]

For each kind: an uninterrupted run of 3 epochs of 10 batches (once per kind and
process); a run with
`ft.BackupAndRestore(save_freq=4)` that raises after global batch 15 (the last
backup is step 12: epoch 1, batch 2), or with `@epoch-end`, `save_freq=5` and a
raise after batch 14 (the last backup is step 10, the end of epoch 0), or with
`@save-epoch`, the same with `save_freq="epoch"`; then a
fresh model with a fresh callback in the same process, which resumes.
Writes `DIR/<spec>.npz` (the reference's and the resumed run's weights) and
`DIR/<spec>.json` (batches trained after the resume, first batch seen, log lines
of logger "ft" at WARNING and above). `tests/test_input_kinds.py` asserts on them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import ft

EPOCHS, BATCHES, BATCH, FEATURES = 3, 10, 4, 3
TOTAL = EPOCHS * BATCHES
# (save_freq, crash after this global batch) for each interruption point.
# `save-epoch` saves in on_epoch_end, `epoch-end` after the epoch's last batch.
POINTS: dict[str, tuple[int | str, int]] = {
    "mid-epoch": (4, 15),
    "epoch-end": (5, 14),
    "save-epoch": ("epoch", 14),
}


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCHES * BATCH, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1))).astype("float32")
    return x, y


class Batches(keras.utils.PyDataset):
    """A PyDataset of the arrays; `noise` adds Python-`random` noise per batch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, noise: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x, self.y, self.noise = x, y, noise

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = slice(i * BATCH, (i + 1) * BATCH)
        x = self.x[s]
        if self.noise:
            x = x + np.float32(random.random())
        return x, self.y[s]


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _sliced() -> Any:
    x, y = make_data()
    return _tf().data.Dataset.from_tensor_slices((x, y))


def _generator() -> Iterator[tuple[np.ndarray, np.ndarray]]:
    x, y = make_data()
    while True:
        for i in range(BATCHES):
            yield x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]


def _unseeded() -> Any:
    _tf().random.set_seed(None)  # no global seed either: each run shuffles differently
    return _sliced().shuffle(40).batch(BATCH)


def _tfrecord(directory: str) -> Any:
    tf = _tf()
    x, y = make_data()
    path = os.path.join(directory, "data.tfrecord")
    if not os.path.exists(path):
        with tf.io.TFRecordWriter(path) as writer:
            for xi, yi in zip(x, y, strict=True):
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=xi)),
                    "y": tf.train.Feature(float_list=tf.train.FloatList(value=yi)),
                }
                example = tf.train.Example(features=tf.train.Features(feature=feature))
                writer.write(example.SerializeToString())
    spec = {
        "x": tf.io.FixedLenFeature([FEATURES], tf.float32),
        "y": tf.io.FixedLenFeature([1], tf.float32),
    }

    def parse(record: Any) -> Any:
        parsed = tf.io.parse_single_example(record, spec)
        return parsed["x"], parsed["y"]

    return tf.data.TFRecordDataset(path).map(parse).batch(BATCH)


def inputs(kind: str, directory: str) -> tuple[Any, dict[str, Any]]:
    """The first argument of `fit` for `kind` (built afresh) and extra `fit` arguments."""
    x, y = make_data()
    tf_kinds: dict[str, Callable[[], tuple[Any, dict[str, Any]]]] = {
        "tfdata": lambda: (_sliced().batch(BATCH), {}),
        "tfdata-filter": lambda: (_sliced().filter(lambda a, b: True).batch(BATCH), {}),
        "tfdata-interleave": lambda: (
            _tf()
            .data.Dataset.range(2)
            .interleave(lambda i: _sliced().shard(2, i), cycle_length=1)
            .batch(BATCH),
            {},
        ),
        "tfrecord": lambda: (_tfrecord(directory), {}),
        "from-generator": lambda: (
            _tf().data.Dataset.from_generator(
                lambda: ((x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)),
                output_signature=(
                    _tf().TensorSpec((None, FEATURES), "float32"),
                    _tf().TensorSpec((None, 1), "float32"),
                ),
            ),
            {},
        ),
        "tfdata-repeat": lambda: (
            _sliced().shuffle(16, seed=3).repeat().batch(BATCH),
            {"steps_per_epoch": BATCHES},
        ),
        "tfdata-reshuffle": lambda: (_sliced().shuffle(40).batch(BATCH), {}),
        "tfdata-unseeded": lambda: (_unseeded(), {}),
    }
    if kind in tf_kinds:
        return tf_kinds[kind]()
    if kind == "numpy":
        return x, {"y": y, "batch_size": BATCH, "shuffle": False}
    if kind == "numpy-shuffle":
        return x, {"y": y, "batch_size": BATCH, "shuffle": True}
    if kind == "steps-per-execution":
        return x, {"y": y, "batch_size": BATCH, "shuffle": True}
    if kind == "pydataset":
        return Batches(x, y, noise=True), {}
    if kind == "pydataset-workers":
        return Batches(x, y, workers=2), {}
    if kind == "pydataset-multiprocessing":
        return Batches(x, y, workers=2, use_multiprocessing=True), {}
    if kind == "generator":
        return _generator(), {"steps_per_epoch": BATCHES}
    raise ValueError(f"unknown kind {kind!r}")


KINDS = (
    "numpy",
    "numpy-shuffle",
    "steps-per-execution",
    "tfdata",
    "tfdata-filter",
    "tfdata-interleave",
    "tfrecord",
    "from-generator",
    "tfdata-repeat",
    "tfdata-reshuffle",
    "tfdata-unseeded",
    "pydataset",
    "pydataset-workers",
    "pydataset-multiprocessing",
    "generator",
)


def make_model(kind: str) -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((FEATURES,)),
            keras.layers.Dense(8, activation="relu"),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(1),
        ]
    )
    spe = 2 if kind == "steps-per-execution" else 1
    model.compile(keras.optimizers.Adam(1e-2), loss="mse", steps_per_execution=spe)
    return model


class Count(keras.callbacks.Callback):
    """Batches this fit trained, the first (epoch, batch) it saw; raises at global step `crash_at`."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__()
        self.crash_at = crash_at
        self.first: list[int] | None = None
        self.trained = 0
        self.epoch = self.begin = 0

    def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
        self.epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self.begin = batch
        if self.first is None:
            self.first = [self.epoch, batch]

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        # With steps_per_execution, one call per step: batches `begin`..`batch`.
        self.trained += batch - self.begin + 1
        if self.crash_at is not None and self.epoch * BATCHES + batch + 1 >= self.crash_at:
            raise RuntimeError(f"interrupted after batch {batch} of epoch {self.epoch}")


def fit(kind: str, directory: str, callbacks: list[keras.callbacks.Callback]) -> keras.Model:
    model = make_model(kind)
    data, kwargs = inputs(kind, directory)
    model.fit(data, epochs=EPOCHS, callbacks=callbacks, verbose=0, **kwargs)
    return model


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


_references: dict[str, keras.Model] = {}


def _reference(kind: str, directory: str) -> keras.Model:
    """The uninterrupted run of `kind`, once per process: every interruption point
    of a kind compares with the same run (seeded by `make_model`)."""
    if kind not in _references:
        _references[kind] = fit(kind, directory, [])
    return _references[kind]


def run(spec: str, out: str) -> None:
    kind, _, point = spec.partition("@")
    save_freq, crash_at = POINTS[point or "mid-epoch"]
    directory = tempfile.mkdtemp(prefix=f"ft-{kind}-")
    backup = os.path.join(directory, "backup")
    reference = _reference(kind, directory)
    try:
        fit(kind, directory, [ft.BackupAndRestore(backup, save_freq=save_freq), Count(crash_at)])
    except RuntimeError as e:
        if "interrupted after batch" not in str(e):
            raise
    else:
        raise AssertionError("the interrupted run was not interrupted")
    lines = Lines()
    logging.getLogger("ft").addHandler(lines)
    count = Count()
    try:
        callback = ft.BackupAndRestore(backup, save_freq=save_freq)
        resumed = fit(kind, directory, [callback, count])
    finally:
        logging.getLogger("ft").removeHandler(lines)
    arrays = {f"reference_{i}": np.asarray(v) for i, v in enumerate(reference.get_weights())}
    arrays.update({f"resumed_{i}": np.asarray(v) for i, v in enumerate(resumed.get_weights())})
    np.savez(os.path.join(out, f"{spec}.npz"), **arrays)
    diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(reference.get_weights(), resumed.get_weights(), strict=True)
    )
    report = {
        "restored": callback.restored,
        "batches_after_resume": count.trained,
        "iterations": int(resumed.optimizer.iterations.numpy()),
        "reference_iterations": int(reference.optimizer.iterations.numpy()),
        "first_seen": count.first,
        "warnings": lines.lines,
        "max_abs_diff": diff,
    }
    with open(os.path.join(out, f"{spec}.json"), "w") as f:
        json.dump(report, f)
    print(spec, json.dumps(report), flush=True)
    shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("kinds", nargs="*", default=list(KINDS))
    args = parser.parse_args()
    if keras.backend.backend() == "tensorflow" and not any(
        k.startswith("tfdata-unseeded") for k in args.kinds
    ):
        # (An unseeded shuffle cannot run with op determinism on.)
        _tf().config.experimental.enable_op_determinism()
    for spec in args.kinds:
        run(spec, args.out)


if __name__ == "__main__":
    main()
