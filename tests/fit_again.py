"""`fit` called again in the same processes, after it raised and after it finished.

    KERAS_BACKEND=jax python -m ft.launch -n 2 tests/fit_again.py --dir D --out W.json

Every process runs the same sequence of fits on one model:

1. phase A: `fit` with callback `a` raises at step 12 (an injected error on
   every process); `fit` again with the same callback restores step 10 and
   finishes;
2. phase B, a second training phase after a successful fit: a new callback
   `b`, `fit` raises at step 7; `fit` again with another new callback on the
   same directory restores step 5 and finishes.

With `--reference` the same fits run without errors or callbacks. The report
holds the weights' checksum after each phase, the restored points and, after
each `fit` that raised, whether the SIGTERM handler was restored and whether the
train function is still ft's guarded one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import ft
from tests.scenario import make_data, make_model


class Crash(keras.callbacks.Callback):
    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step, self.steps = at_step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.steps == self.at_step:
            raise RuntimeError(f"injected error at step {self.steps}")


def digest(model: keras.Model) -> str:
    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v.value)).tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--reference", action="store_true", help="no errors, no callbacks")
    args = parser.parse_args()
    index = int(os.environ.get("FT_PROCESS_INDEX", "0"))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    x, y = make_data()
    batch_size = 8
    strategy = ft.strategies.auto()
    if keras.backend.backend() == "jax":
        import jax

        count = jax.process_count()
        batch_size //= count
        i = jax.process_index()
        x, y = (
            a.reshape(-1, 8, a.shape[-1])[:, i * batch_size : (i + 1) * batch_size].reshape(
                -1, a.shape[-1]
            )
            for a in (x, y)
        )
    with strategy.scope():
        model = make_model(synchronized_bn=keras.backend.backend() == "tensorflow")
    report: dict = {"restored": [], "handler_after_raise": [], "guard_after_raise": []}
    fit = dict(batch_size=batch_size, verbose=0)
    if args.reference:
        model.fit(x, y, epochs=3, **fit)
        report["phase_a"] = digest(model)
        model.fit(x, y, epochs=3, **fit)
        report["phase_b"] = digest(model)
        with open(args.out.format(index=index), "w") as f:
            json.dump(report, f)
        return
    default_handler = signal.getsignal(signal.SIGTERM)

    def fit_raising(callback: ft.BackupAndRestore, at_step: int) -> None:
        try:
            model.fit(x, y, epochs=3, callbacks=[callback, Crash(at_step)], **fit)
        except RuntimeError as e:
            assert "injected error" in str(e), e
        else:
            raise AssertionError("the injected error was not raised")
        report["handler_after_raise"].append(signal.getsignal(signal.SIGTERM) == default_handler)
        report["guard_after_raise"].append(hasattr(model.train_function, "_ft_original"))

    # Phase A: the same callback again.
    a = ft.BackupAndRestore(
        os.path.join(args.dir, "a"), save_freq=5, save_before_preemption=True, timeout=60
    )
    fit_raising(a, 12)
    model.fit(x, y, epochs=3, callbacks=[a], **fit)
    report["restored"].append(a.restored)
    report["phase_a"] = digest(model)
    # Phase B: a second training phase, new callbacks on one directory.
    fit_raising(ft.BackupAndRestore(os.path.join(args.dir, "b"), save_freq=5, timeout=60), 7)
    b = ft.BackupAndRestore(os.path.join(args.dir, "b"), save_freq=5, timeout=60)
    model.fit(x, y, epochs=3, callbacks=[b], **fit)
    report["restored"].append(b.restored)
    report["phase_b"] = digest(model)
    with open(args.out.format(index=index), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
