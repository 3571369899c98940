"""A small, deterministic training run driven by tests in a process of its own.

    KERAS_BACKEND=jax python tests/scenario.py --backup-dir D --out W.npz [options]

Trains an MLP with BatchNormalization and Dropout under Adam, with
`ft.BackupAndRestore` unless `--no-backup`, and writes the final weights and a
JSON report (restored point, batches seen, history). `--crash-at-step N`
raises inside `fit` after global step N; `--kill-at-step N`,
`--sigterm-at-step N` and `--sigstop-at-step N` add `ft.testing`'s fault
callbacks (once per job: under `ft.testing.run` the marker goes into the
job's directory); `--kill-during-save` SIGKILLs the process inside the N-th
save.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras
import numpy as np

import ft
import ft.testing

SAMPLES, FEATURES, BATCH = 96, 8, 8


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, FEATURES)).astype("float32")
    y = (x @ rng.normal(size=(FEATURES, 1)) + 0.1 * rng.normal(size=(SAMPLES, 1))).astype("float32")
    return x, y


def set_random_seed(seed: int) -> None:
    """`keras.utils.set_random_seed`, without importing TensorFlow into a JAX
    process that has not imported it: Keras imports TF only to seed it, which
    costs every JAX worker of the suite 2-3 s of its start on 2 cores. Keras
    then records TF as unavailable in this process, so a JAX run that feeds
    `tf.data` must import TensorFlow first (`main` does)."""
    if keras.backend.backend() != "jax" or "tensorflow" in sys.modules:
        keras.utils.set_random_seed(seed)
        return
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # import fails: not seeded
    try:
        keras.utils.set_random_seed(seed)
    finally:
        del sys.modules["tensorflow"]


def make_model(synchronized_bn: bool = False, units: int = 16) -> keras.Model:
    set_random_seed(1234)
    model = keras.Sequential(
        [
            keras.layers.Dense(units, activation="relu"),
            # Unsynchronized BatchNorm statistics differ per worker even in an
            # uninterrupted MWMS run; synchronized ones are the same everywhere.
            keras.layers.BatchNormalization(synchronized=synchronized_bn),
            keras.layers.Dropout(0.25),
            keras.layers.Dense(1),
        ]
    )
    model.compile(keras.optimizers.Adam(1e-2), loss="mse", metrics=["mae"])
    return model


class Recorder(keras.callbacks.Callback):
    """Records batches, and crashes or stalls at a chosen global step."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.seen: list[list[int]] = []
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        self.seen.append([self.epoch, batch])

    def on_train_batch_end(self, batch, logs=None):
        step = len(self.seen) + self.args.steps_before
        print(f"step {step}", flush=True)
        if self.args.step_seconds:
            time.sleep(self.args.step_seconds)
        if self.args.hold_at_step == step:
            _hold_for_sigterm(60.0)
        if self.args.stall_at_step == step:
            print("stalling", flush=True)
            time.sleep(120)  # alive (heartbeats go on) but absent from the collectives
        if self.args.crash_at_step == step:
            raise RuntimeError(f"crash at step {step}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backup-dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--save-freq", default="epoch")
    parser.add_argument(
        "--input", choices=["numpy", "numpy-shuffle", "tfdata", "steps"], default="numpy"
    )
    parser.add_argument("--crash-at-step", type=int)
    parser.add_argument("--kill-at-step", type=int)
    parser.add_argument("--kill-during-save", type=int, help="SIGKILL inside the N-th save")
    parser.add_argument("--steps-before", type=int, default=0, help="steps done by earlier runs")
    parser.add_argument("--keep", action="store_true", help="delete_checkpoint=False")
    parser.add_argument("--no-backup", action="store_true")
    parser.add_argument("--strategy", choices=["none", "auto"], default="none")
    parser.add_argument("--kill-worker", type=int, help="only this worker gets the fault")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--save-before-preemption", action="store_true")
    parser.add_argument("--async-save", action="store_true", help="async_save=True")
    parser.add_argument("--double-checkpoint", action="store_true", help="keep two backups")
    parser.add_argument("--units", type=int, default=16, help="units of the first Dense layer")
    parser.add_argument(
        "--slow-writes", type=float, help="every backup write takes this much longer"
    )
    parser.add_argument(
        "--step-seconds", type=float, help="every training step takes this much longer"
    )
    parser.add_argument("--heartbeat", type=float, help="ft.strategies.auto(heartbeat_timeout=)")
    parser.add_argument("--sigstop-at-step", type=int, help="SIGSTOP itself there")
    parser.add_argument("--stall-at-step", type=int, help="sleep 120 s there, alive")
    parser.add_argument(
        "--hold-at-step", type=int, help="wait there (at most 60 s) until a SIGTERM arrives"
    )
    parser.add_argument(
        "--late-worker", type=int, help="this worker learns of a preemption 2 s late"
    )
    parser.add_argument("--collective-timeout", type=float, help="auto(collective_timeout=)")
    parser.add_argument("--sigterm-at-step", type=int, help="send SIGTERM to itself there")
    parser.add_argument("--pid-file", help="write this process's pid here, per worker")
    parser.add_argument(
        "--model-parallel", action="store_true", help="JAX: split the first kernel over processes"
    )
    parser.add_argument(
        "--forbid-writes", action="store_true", help="non-chief workers fail on any store write"
    )
    args = parser.parse_args()
    index = int(os.environ.get("FT_PROCESS_INDEX", "0"))
    args.out = args.out.format(index=index)
    first_launch = os.environ.get("FT_RESTART_COUNT", "0") == "0"
    if (args.kill_worker is not None and args.kill_worker != index) or not first_launch:
        args.kill_during_save = args.stall_at_step = None
    if args.pid_file:
        with open(f"{args.pid_file}.{index}", "w") as f:
            f.write(str(os.getpid()))
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, lambda *_: print("ignoring SIGTERM", flush=True))

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    if args.late_worker == index:
        _learn_preemption_late(2.0)
    if args.forbid_writes and index != 0:
        _forbid_store_writes()
    if args.input in ("tfdata", "steps"):
        import tensorflow  # noqa: F401  (before `set_random_seed`: it seeds TF then)
    x, y = make_data()
    batch_size = BATCH
    jax_processes = 1
    if args.strategy == "auto":
        layout_map = None
        if keras.backend.backend() == "jax":
            ft.strategies.initialize(heartbeat_timeout=args.heartbeat)
            import jax

            jax_processes = jax.process_count()
            if args.model_parallel:
                layout_map = _split_first_kernel(jax.devices())
            elif jax_processes > 1:
                # Each process feeds its share of every global batch.
                batch_size = BATCH // jax_processes
                index = jax.process_index()
                x, y = (
                    a.reshape(-1, BATCH, a.shape[-1])[
                        :, index * batch_size : (index + 1) * batch_size
                    ].reshape(-1, a.shape[-1])
                    for a in (x, y)
                )
        strategy = ft.strategies.auto(
            heartbeat_timeout=args.heartbeat,
            collective_timeout=args.collective_timeout,
            layout_map=layout_map,
        )
        with strategy.scope():
            model = make_model(
                synchronized_bn=keras.backend.backend() == "tensorflow", units=args.units
            )
    else:
        model = make_model(units=args.units)
    callbacks: list[keras.callbacks.Callback] = []
    backup = None
    if not args.no_backup:
        freq: str | int | bool = args.save_freq
        if args.save_freq == "false":
            freq = False
        elif args.save_freq != "epoch":
            freq = int(args.save_freq)
        backup = ft.BackupAndRestore(
            args.backup_dir,
            save_freq=freq,
            delete_checkpoint=not args.keep,
            save_before_preemption=args.save_before_preemption,
            timeout=args.timeout,
            async_save=True if args.async_save else None,
            double_checkpoint=args.double_checkpoint,
        )
        callbacks.append(backup)
        if args.kill_during_save:
            _kill_inside_save(backup, args.kill_during_save)
        if args.slow_writes:
            _slow_writes(backup, args.slow_writes)
    recorder = Recorder(args)
    callbacks.append(recorder)
    callbacks.extend(_faults(args, index))
    fit_kwargs: dict = dict(epochs=args.epochs, callbacks=callbacks, verbose=0)
    if args.input == "tfdata":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
        history = model.fit(data, **fit_kwargs)
    elif args.input == "steps":
        import tensorflow as tf

        data = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(BATCH)
        history = model.fit(data, steps_per_epoch=5, **fit_kwargs)
    else:
        history = model.fit(
            x, y, batch_size=batch_size, shuffle=args.input == "numpy-shuffle", **fit_kwargs
        )
    values = [v.value for v in model.weights] + [model.optimizer.iterations.value]
    if jax_processes > 1:
        from jax.experimental import multihost_utils

        values = [multihost_utils.process_allgather(v, tiled=True) for v in values]
    weights = {f"w{i:03d}": np.asarray(w) for i, w in enumerate(values[:-1])}
    weights["iterations"] = np.asarray(values[-1])
    np.savez(args.out, **weights)
    report = {
        "restored": backup.restored if backup else None,
        "seen": recorder.seen,
        "history": {k: [float(v) for v in vs] for k, vs in history.history.items()},
        "backup_dir_exists": bool(args.backup_dir) and _exists(args.backup_dir),
        # the processes this one trained with, as ft's callback saw them
        "num_processes": backup._coordinator.num_processes if backup else None,
        "moved": [backup.stats.moved_saves, backup.stats.moved_steps] if backup else None,
        "commits": backup.stats.commits if backup else None,
    }
    kernel = model.layers[0].kernel
    if hasattr(kernel.value, "sharding"):
        report["first_kernel_shard"] = list(kernel.value.sharding.shard_shape(kernel.shape))
    with open(args.out + ".json", "w") as f:
        json.dump(report, f)


def _faults(args: argparse.Namespace, index: int) -> list[keras.callbacks.Callback]:
    """`ft.testing`'s fault callbacks the arguments ask for, on `--kill-worker` or every worker."""
    worker = index if args.kill_worker is None else args.kill_worker
    marker_dir = None  # ft.testing.run's job directory: once per job
    if "FT_TESTING_DIR" not in os.environ:
        if os.environ.get("FT_RESTART_COUNT", "0") != "0":
            return []  # a plain `python -m ft.launch` restart: the faults were for the first
        marker_dir = tempfile.mkdtemp()  # one process on its own: once per process
    faults: list[keras.callbacks.Callback] = []
    if args.kill_at_step is not None:
        faults.append(ft.testing.KillWorker(worker, args.kill_at_step, marker_dir=marker_dir))
    if args.sigterm_at_step is not None:
        faults.append(ft.testing.PreemptWorker(worker, args.sigterm_at_step, marker_dir=marker_dir))
    if args.sigstop_at_step is not None:
        faults.append(
            ft.testing.FreezeWorker(worker, args.sigstop_at_step, 600.0, marker_dir=marker_dir)
        )
    return faults


def _split_first_kernel(devices: list) -> keras.distribution.LayoutMap:
    """A layout that splits the first Dense kernel's output units over all devices."""
    mesh = keras.distribution.DeviceMesh(
        shape=(1, len(devices)), axis_names=("batch", "model"), devices=devices
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*/dense/kernel"] = (None, "model")
    layout_map[".*/dense/bias"] = ("model",)
    return layout_map


def _hold_for_sigterm(seconds: float) -> None:
    """Wait until a SIGTERM arrives, at most `seconds`; it is handled as it would be
    otherwise (by ft's preemption watch). A test that signals after reading a step's
    line then never races a run that finishes first."""
    arrived = threading.Event()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        arrived.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    try:
        arrived.wait(seconds)  # the handler runs on this thread, inside the wait
    finally:
        signal.signal(signal.SIGTERM, previous)


def _learn_preemption_late(seconds: float) -> None:
    """This worker's preemption listener learns of a SIGTERM `seconds` late."""
    from ft.preemption import PreemptionWatch

    original = PreemptionWatch._wait_for_preemption

    def late(self):
        learned = original(self)
        if learned:
            print("learning of the preemption late", flush=True)
            time.sleep(seconds)
        return learned

    PreemptionWatch._wait_for_preemption = late  # type: ignore[method-assign]


def _exists(backup_dir: str) -> bool:
    """Whether anything is left in `backup_dir`, a path or a bucket URL."""
    if "://" not in backup_dir:
        return os.path.exists(backup_dir)
    from ft.store import background_removal
    from ft.store.bucket_paths import BucketURL, filesystem

    # fit returned with nothing committed; the objects go on a thread of their own.
    if not background_removal.wait(120):
        raise TimeoutError(f"the objects in {backup_dir} were not removed in 120 s")
    location = BucketURL.parse(backup_dir)
    fs = filesystem(location.scheme)
    fs.invalidate_cache(location.fs_path())
    try:
        return bool(fs.find(location.fs_path()))
    except FileNotFoundError:
        return False


def _forbid_store_writes() -> None:
    """Every method that writes into backup_dir raises on this process."""
    from ft.checkpoint_store import CheckpointStore
    from ft.store.bucket import BucketStore

    def refuse(name: str):
        def method(self, *args, **kwargs):
            print(f"FORBIDDEN WRITE: CheckpointStore.{name}", flush=True)
            os._exit(3)

        return method

    for name in ("prepare", "remove_partial", "write", "delete", "_discard"):
        setattr(CheckpointStore, name, refuse(name))
    for name in ("prepare", "lock", "remove_partial", "write", "_commit", "delete", "_remove"):
        setattr(BucketStore, name, refuse(name))


def _slow_writes(backup: ft.BackupAndRestore, seconds: float) -> None:
    """Every backup this process writes takes `seconds` longer (a slow store)."""
    store = backup._store
    write, write_collective = store.write, store.write_collective

    def slow_write(record, arrays):
        time.sleep(seconds)
        return write(record, arrays)

    def slow_write_collective(record, arrays, coordinator, timeout):
        time.sleep(seconds)
        return write_collective(record, arrays, coordinator, timeout)

    store.write = slow_write  # type: ignore[method-assign]
    store.write_collective = slow_write_collective  # type: ignore[method-assign]


def _kill_inside_save(backup: ft.BackupAndRestore, nth: int) -> None:
    """SIGKILL the process after the N-th save wrote its arrays, before it commits."""
    store = backup._store
    if not hasattr(store, "_orbax"):  # a bucket: arrays go through bucket_arrays
        from ft.store import bucket_arrays

        write_data = bucket_arrays.write_data
        count = {"n": 0}

        def dying_write_data(*a, **k):
            write_data(*a, **k)
            count["n"] += 1
            if count["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)

        bucket_arrays.write_data = dying_write_data  # type: ignore[assignment]
        return
    original = store._orbax
    calls = {"n": 0}

    class Dying:
        def __init__(self, inner):
            self.inner = inner

        def save(self, *a, **k):
            result = self.inner.save(*a, **k)
            calls["n"] += 1
            if calls["n"] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        def __getattr__(self, name):
            return getattr(self.inner, name)

    store._orbax = lambda: Dying(original())  # type: ignore[method-assign]
    collective = store._collective_orbax  # JAX multi-host: every process writes
    store._collective_orbax = lambda name: Dying(collective(name))  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
