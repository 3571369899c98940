"""Two exactness checks of background saves, on whatever device the backend runs on.

    python benchmarks/exactness_check.py [--width 512] [--out result.json]

1. interrupted vs uninterrupted: a run that crashes mid-epoch and resumes from its
   newest backup ends with weights bit-identical to a run that never stopped (Adam,
   BatchNorm, Dropout, shuffled input; saves in the background, every 3 steps).
2. overlap: a save whose write is held back while training runs on captures the state
   of the step it was taken at, bit for bit (restored and compared with the weights
   recorded at that step).

On a GPU set `XLA_FLAGS=--xla_gpu_deterministic_ops=true` (and TensorFlow's op
determinism on that backend) so that two runs of the same steps are comparable at all.
Prints one JSON line `EXACTNESS {...}` and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import keras
import numpy as np

import ft
from ft.checkpoint_store import CheckpointStore

EPOCHS, BATCH, BATCHES = 2, 16, 12  # 24 steps


def make_model(width: int) -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((32,)),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-3), "mse")
    return model


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * BATCHES, 32)).astype("float32")
    return x, x[:, :4].sum(axis=1, keepdims=True)


def state(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables] + [
        np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables
    ]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True)
    )


class Crash(keras.callbacks.Callback):
    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at, self.step = at_step, 0

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.step += 1
        if self.step == self.at:
            raise RuntimeError("interrupted")


def fit(model: keras.Model, callbacks: list[Any]) -> None:
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=True, callbacks=callbacks, verbose=0)


def interrupted_vs_uninterrupted(width: int, work: Path) -> dict[str, Any]:
    """A crash at step 17 (mid-epoch 2), then a resume: the same weights as no crash."""
    whole = make_model(width)
    cb = ft.BackupAndRestore(work / "whole", save_freq=3, async_save=True)
    fit(whole, [cb])
    expected = state(whole)
    where = cb._snapshotter.last_where
    first = ft.BackupAndRestore(work / "cut", save_freq=3, async_save=True)
    try:
        fit(make_model(width), [first, Crash(17)])
    except RuntimeError as e:
        if str(e) != "interrupted":
            raise
    first._pipeline.wait(300)  # the save in flight at the crash commits
    resumed_model = make_model(width)
    resumed = ft.BackupAndRestore(work / "cut", save_freq=3, async_save=True)
    fit(resumed_model, [resumed])
    return {
        "bit_identical": same(expected, state(resumed_model)),
        "resumed_from": resumed.restored,
        "snapshot_where": where,
        "commits_uninterrupted": cb.stats.commits,
        "moved_saves_uninterrupted": cb.stats.moved_saves,
    }


def overlap(width: int, work: Path) -> dict[str, Any]:
    """Hold the write of the step-5 save back while training runs 4 more steps."""
    release = threading.Event()
    original = CheckpointStore.write

    def held_write(self: CheckpointStore, record: Any, arrays: Any) -> str:
        if record.step == 5:
            release.wait(120)
        return original(self, record, arrays)

    class Record(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step, self.at_save = 0, None

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.step += 1
            if self.step == 5:
                self.at_save = state(self.model)
            if self.step == 9:
                release.set()  # training ran on while the save was held
                raise RuntimeError("interrupted")

    CheckpointStore.write = held_write  # type: ignore[method-assign]
    try:
        cb = ft.BackupAndRestore(work / "overlap", save_freq=5, async_save=True)
        recorder = Record()
        try:
            fit(make_model(width), [cb, recorder])
        except RuntimeError as e:
            if str(e) != "interrupted":
                raise
        cb._pipeline.wait(300)
    finally:
        CheckpointStore.write = original  # type: ignore[method-assign]
    restored_model = make_model(width)
    probe = ft.BackupAndRestore(work / "overlap", save_freq=1000, delete_checkpoint=False)

    class Stop(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.captured = state(self.model)  # right after ft restored (ft runs first)

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.model.stop_training = True

    stop = Stop()
    fit(restored_model, [probe, stop])
    assert recorder.at_save is not None
    return {
        "bit_identical": same(recorder.at_save, stop.captured),
        "restored_step": (probe.restored or {}).get("step"),
        "snapshot_where": cb._snapshotter.last_where,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ft-exact-"))
    try:
        result = {
            "backend": keras.backend.backend(),
            "interrupted_vs_uninterrupted": interrupted_vs_uninterrupted(args.width, work),
            "overlap": overlap(args.width, work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["ok"] = (
        all(
            result[k]["bit_identical"] and result[k]["snapshot_where"]
            for k in ("interrupted_vs_uninterrupted", "overlap")
        )
        and result["overlap"]["restored_step"] == 5
    )
    line = json.dumps(result)
    print("EXACTNESS " + line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if result["ok"] else 1)  # the engines' teardown can take long on a busy host


if __name__ == "__main__":
    main()
