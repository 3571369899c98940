"""How long a preemption takes at 25M parameters: from SIGTERM to the process's exit.

    KERAS_BACKEND=jax python benchmarks/preemption_save.py --backup-dir /tmp/p
    KERAS_BACKEND=tensorflow python -m ft.launch -n 2 \
        benchmarks/preemption_save.py --backup-dir /tmp/q

A 25M-parameter MLP with Adam (300 MB of state) trains with
`save_before_preemption=True`; worker 0 sends itself SIGTERM after step 3. Each
process prints the seconds from that SIGTERM to its exit (agreement, the save,
its commit and the final barrier included), which must fit the grace period
(30 s on Kubernetes by default).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import ft


class SigtermAt(keras.callbacks.Callback):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step and os.environ.get("FT_PROCESS_INDEX", "0") == "0":
            os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backup-dir", required=True)
    parser.add_argument("--sigterm-at-step", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get("FT_RESTART_COUNT", "0") != "0":
        return  # measured once: the relaunch after exit 42 has nothing to do
    strategy = ft.strategies.auto(seed=0)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.layers.Input((1000,)),
                keras.layers.Dense(5000),
                keras.layers.Dense(4000),
                keras.layers.Dense(10),
            ]
        )
        model.compile(keras.optimizers.Adam(1e-4), loss="mse")
    print(f"parameters: {model.count_params():,}", flush=True)
    x = np.random.default_rng(0).normal(size=(64, 1000)).astype("float32")
    y = np.zeros((64, 10), "float32")
    start: list[float] = []
    previous = signal.getsignal(signal.SIGTERM)

    def record(signum, frame):  # chained before ft's handler sees the signal
        start.append(time.monotonic())

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            ft_handler = signal.getsignal(signal.SIGTERM)

            def both(signum, frame):
                record(signum, frame)
                if callable(ft_handler):
                    ft_handler(signum, frame)

            signal.signal(signal.SIGTERM, both)

    atexit.register(
        lambda: start and print(f"SIGTERM to exit: {time.monotonic() - start[0]:.2f} s", flush=True)
    )
    callbacks = [
        ft.BackupAndRestore(args.backup_dir, save_freq=False, save_before_preemption=True),
        Timer(),
        SigtermAt(args.sigterm_at_step),
    ]
    try:
        model.fit(x, y, batch_size=8, epochs=100, callbacks=callbacks, verbose=0)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
