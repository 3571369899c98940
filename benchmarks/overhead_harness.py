"""The measuring side of `checkpoint_overhead.py`: runs in a child process, one backend and size.

Every callback runs in the same process on the same model and data:

- `fit` with the raw floor, `ft.BackupAndRestore`, `keras.callbacks.BackupAndRestore`
  and `keras.callbacks.OrbaxCheckpoint`, each right after a `fit` without callbacks (its
  baseline: the machine's load drifts), in an order that rotates from repeat to repeat;
- each callback is wrapped in `Timed`, which measures, inside `fit`, the time the training
  thread spends in the callback's hooks (blocked), the wait at the end of `fit`, and the
  restore at the start of `fit`;
- the limits of the same bytes, each alone: device-to-device copy (one jitted dispatch),
  device-to-host copy (pageable and page-locked), memcpy, write + fsync, cold read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {  # width, hidden layers of a Dense stack on 1024 inputs (state = 3 x params)
    "tiny": (64, 2),
    "1M": (1000, 1),
    "25M": (2500, 4),
    "100M": (5000, 4),
    "300M": (7168, 7),
}
INPUTS = 1024
RESTORE_SAMPLES = 7


def train_end_clock() -> Any:
    """A callback that notes when the callbacks before it ended training
    (their `on_train_end` included), in `.at`.

    A `fit` is timed to there: under the TensorFlow backend, `fit` can return
    seconds after `on_train_end` (measured: 4.7 s after a 56-step fit of the
    25M model, none after the next one; always about 2.6 s times a power of
    2), a teardown that no callback causes and that otherwise swamped what
    the callbacks cost.
    """
    import keras

    class TrainEnd(keras.callbacks.Callback):
        at = 0.0

        def on_train_end(self, logs: Any = None) -> None:
            self.at = time.perf_counter()

    return TrainEnd()


class PeakRSS:
    """Highest resident set size while the block runs, sampled every 5 ms."""

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _state(model: Any) -> list[Any]:
    return [v.value for v in model.variables + model.optimizer.variables]


def _on_accelerator(values: list[Any]) -> bool:
    devices = getattr(values[0], "devices", None)
    return devices is not None and any(d.platform != "cpu" for d in devices())


def _host_view(value: Any) -> np.ndarray:
    read = getattr(value, "read_value", None)
    return np.asarray(read().numpy() if read is not None else value)


class Timed:
    """Wraps a callback; times its hooks on the training thread, inside `fit`.

    It overrides `on_train_batch_end` only when the wrapped callback does: a
    callback that overrides it makes Keras wait for every step's logs (a device
    sync per step), which ft avoids. ft handles a step's end from `fit`'s
    `CallbackList` instead (`ft.fit_loop.at_each_step_end`): that handler is timed.
    """

    def __new__(cls, inner: Any) -> Any:
        import keras
        from keras.src.utils.python_utils import is_default

        per_step_end = not is_default(inner.on_train_batch_end)

        class _Timed(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.inner = inner
                self.blocked = 0.0
                self.begin = 0.0
                self.end = 0.0
                step_ended = getattr(inner, "_step_ended", None)
                if step_ended is not None:  # ft: bound by its on_train_begin

                    def timed_step_ended(batch: int) -> None:
                        start = time.perf_counter()
                        step_ended(batch)
                        self.blocked += time.perf_counter() - start

                    inner._step_ended = timed_step_ended

            def set_model(self, model: Any) -> None:
                super().set_model(model)
                self.inner.set_model(model)

            def set_params(self, params: Any) -> None:
                super().set_params(params)
                self.inner.set_params(params)

            def on_train_begin(self, logs: Any = None) -> None:
                start = time.perf_counter()
                self.inner.on_train_begin(logs)
                self.begin = time.perf_counter() - start

            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                self.inner.on_epoch_begin(epoch, logs)

            def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
                start = time.perf_counter()
                self.inner.on_train_batch_begin(batch, logs)
                self.blocked += time.perf_counter() - start

            if per_step_end:

                def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
                    start = time.perf_counter()
                    self.inner.on_train_batch_end(batch, logs)
                    self.blocked += time.perf_counter() - start

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                start = time.perf_counter()
                self.inner.on_epoch_end(epoch, logs)
                self.blocked += time.perf_counter() - start

            def on_train_end(self, logs: Any = None) -> None:
                start = time.perf_counter()
                self.inner.on_train_end(logs)
                self.end = time.perf_counter() - start

        return _Timed()


def per_step_hook() -> Any:
    """A callback that saves nothing and overrides `on_train_batch_end` with a no-op:
    what Keras's wait for every step's logs costs a callback that has that hook."""
    import keras

    class PerStepHook(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            pass

    return PerStepHook()


def raw_floor(directory: Path, every: int) -> Any:
    """The floor: copy the state once on the training thread; write raw bytes, fsync and
    rename on a background thread; one save in flight. Saves after every `every` steps
    (at the next step's begin, or the epoch's end)."""
    import keras

    class RawFloor(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.thread: threading.Thread | None = None
            self.buffers: list[np.ndarray] = []
            self.pipeline: list[float] = []
            directory.mkdir(parents=True, exist_ok=True)

        # At the next step's begin (the state is still that of the step before),
        # not in on_train_batch_end: Keras would wait for every step's logs.
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            if self.step and self.step % every == 0:
                self._save()
            self.step += 1

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.step % every == 0:
                self._save()

        def _save(self) -> None:
            if self.thread is not None:
                self.thread.join()
            values = _state(self.model)
            if _on_accelerator(values):
                import jax

                arrays = [np.asarray(a) for a in jax.device_get(values)]
            else:
                if len(self.buffers) != len(values):
                    self.buffers = [np.empty_like(_host_view(v)) for v in values]
                for buffer, value in zip(self.buffers, values, strict=True):
                    np.copyto(buffer, _host_view(value))
                arrays = self.buffers
            step = self.step
            self.thread = threading.Thread(target=self._write, args=(arrays, step))
            self.thread.start()

        def _write(self, arrays: list[np.ndarray], step: int) -> None:
            start = time.perf_counter()
            write_raw(directory, arrays, step)
            self.pipeline.append(time.perf_counter() - start)

        def on_train_end(self, logs: Any = None) -> None:
            if self.thread is not None:
                self.thread.join()

    return RawFloor()


def write_raw(directory: Path, arrays: list[np.ndarray], step: int) -> None:
    """The raw floor's write: the arrays' bytes into one file, fsync, rename, fsync of
    the directory, then the previous file removed."""
    tmp, final = directory / f".tmp-{step}", directory / f"state-{step}"
    with open(tmp, "wb") as f:
        for a in arrays:
            f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    fd = os.open(directory, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    for old in directory.glob("state-*"):
        if old != final:
            old.unlink()


def limits(model: Any, work: Path) -> dict[str, float | None]:
    """Seconds for the machine to move the state's bytes, each way alone."""
    values = _state(model)
    out: dict[str, float | None] = {}
    host = [np.array(_host_view(v)) if not _on_accelerator(values) else None for v in values]
    try:
        import jax
        import jax.numpy as jnp

        jax_values = isinstance(values[0], jax.Array)
    except ImportError:
        jax_values = False
    if jax_values:
        copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs])
        jax.block_until_ready(copy(values))  # compile
        start = time.perf_counter()
        fresh = copy(values)
        jax.block_until_ready(fresh)
        out["device_copy"] = time.perf_counter() - start
        start = time.perf_counter()  # fresh arrays: a jax.Array caches its host copy
        host = [np.asarray(a) for a in jax.device_get(fresh)]
        out["to_host_pageable"] = time.perf_counter() - start
        for key in ("to_host_pinned_first", "to_host_pinned"):
            fresh = copy(values)
            jax.block_until_ready(fresh)
            try:
                start = time.perf_counter()
                pinned = jax.device_put(
                    fresh, [a.sharding.with_memory_kind("pinned_host") for a in fresh]
                )
                jax.block_until_ready(pinned)
                out[key] = time.perf_counter() - start
            except Exception:  # no pinned_host memory here
                out[key] = None
                continue
            try:  # does NumPy read the page-locked buffer in place?
                view = np.asarray(pinned[0])
                out["pinned_is_zero_copy"] = float(
                    view.ctypes.data == pinned[0].unsafe_buffer_pointer()
                )
            except Exception:
                out["pinned_is_zero_copy"] = None
            del pinned
        del fresh
    else:
        out["device_copy"] = out["to_host_pageable"] = out["to_host_pinned"] = None
    buffers = [np.empty_like(a) for a in host]
    start = time.perf_counter()
    for dst, src in zip(buffers, host, strict=True):
        np.copyto(dst, src)
    out["memcpy"] = time.perf_counter() - start
    del buffers
    raw = work / "raw"
    start = time.perf_counter()
    with open(raw, "wb") as f:
        for a in host:
            f.write(memoryview(a).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    out["write_fsync"] = time.perf_counter() - start
    out["cache_dropped"] = float(drop_caches())
    start = time.perf_counter()
    with open(raw, "rb") as f:
        while f.read(16 << 20):
            pass
    out["cold_read_raw"] = time.perf_counter() - start
    raw.unlink()
    return out


def fresh_memory(nbytes: int) -> float:
    """Seconds a new process takes to write the first byte of every page of
    `nbytes` of new memory: what landing a restore's bytes costs a resuming
    process beyond reading them. Not the cold read's (it reads into one reused
    buffer). On a virtual machine that hands back freed memory to its host this
    varies by 10 x or more from run to run (docs/benchmark.md)."""
    code = (
        "import time, numpy as np; t = time.perf_counter(); "
        f"a = np.empty({int(nbytes)}, np.uint8); a[::4096] = 1; "
        "print(time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(done.stdout.strip())


def cold_read(directory: Path) -> float:
    drop_caches()
    start = time.perf_counter()
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(16 << 20):
                    pass
    return time.perf_counter() - start


def run(
    size: str,
    saves: int,
    close_every: int | None,
    repeats: int,
    modes: tuple[str, ...] = ("close", "spaced"),
    restores: int = 0,
) -> dict[str, Any]:
    """Measure `size` in `modes`; restore after the first (`restores` samples, or
    at least `RESTORE_SAMPLES`)."""
    import keras

    import ft
    from ft.store import background_removal

    warm_up(Path(tempfile.mkdtemp(prefix="ft-bench-warm-", dir=os.environ.get("FT_BENCH_DIR"))))
    width, layers = SIZES[size]
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((INPUTS,))]
        + [keras.layers.Dense(width, activation="relu", name=f"h{i}") for i in range(layers)]
        + [keras.layers.Dense(10, name="out")]
    )
    model.compile(keras.optimizers.Adam(1e-6), "mse")
    batch = 32
    x = np.random.default_rng(0).normal(size=(batch * 4, INPUTS)).astype("float32")
    y = np.zeros((batch * 4, 10), "float32")
    model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # compile, build the optimizer
    work = Path(tempfile.mkdtemp(prefix="ft-bench-", dir=os.environ.get("FT_BENCH_DIR")))
    lim = limits(model, work)
    state_bytes = sum(int(_host_view_nbytes(v)) for v in _state(model))

    peaks: list[int] = []

    def fit(steps: int, callbacks: list[Any]) -> float:
        model._initial_epoch = None  # Keras's BackupAndRestore leaves it set after a restore
        xs = np.resize(x, (steps * batch, INPUTS))
        ys = np.zeros((steps * batch, 10), "float32")
        clock = train_end_clock()
        with PeakRSS() as peak:
            start = time.perf_counter()
            model.fit(xs, ys, batch_size=batch, epochs=1, callbacks=[*callbacks, clock], verbose=0)
        elapsed = clock.at - start
        peaks.append(peak.peak - peak.start)
        # ft removes deleted backups on a thread of its own: not in this fit's
        # time, nor in the next one's.
        background_removal.wait(600)
        return elapsed

    step_seconds = fit(20, []) / 20
    estimate = (lim.get("to_host_pinned") or lim.get("memcpy") or 0.0) + (lim["write_fsync"] or 0)
    result: dict[str, Any] = {
        "size": size,
        "params": int(model.count_params()),
        "state_bytes": state_bytes,
        "step_seconds": step_seconds,
        "limits": lim,
        "modes": {},
    }
    # Close saves first: their pipelines say how far apart "spaced" saves must be.
    close = close_every or max(1, math.ceil(0.3 * estimate / max(step_seconds, 1e-6)))
    for mode in modes:
        if mode == "close":
            every = close
        else:
            slowest = max(
                [estimate]
                + [
                    r.get("pipeline_per_save") or 0.0
                    for name in ("raw_floor", "ft")
                    for r in result["modes"].get("close", {}).get("runs", {}).get(name, [])
                ]
            )
            # Twice the estimate: on the H200 a write during training took up to
            # 1.5 x the write + fsync measured alone (the raw floor's too), and
            # at 1.5 x the last save's pipeline outlasted fit's tail.
            every = max(2, math.ceil(2.0 * slowest / max(step_seconds, 1e-6)))
        # `saves` saves come due (at steps every, 2 x every, ...), then a tail
        # of every - 1 steps with none: spaced, the last save's pipeline ends
        # in that tail as the others did before the next save; close, fit's
        # end waits for it. No save falls on fit's last step unless every = 1.
        steps = saves * every + every - 1
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in range(repeats):
            makers = {
                "raw_floor": lambda d, e=every: raw_floor(d, e),
                "ft": lambda d, e=every: ft.BackupAndRestore(d, save_freq=e, async_save=True),
                "keras_backup_and_restore": lambda d, e=every: keras.callbacks.BackupAndRestore(
                    str(d), save_freq=e
                ),
                "keras_orbax_checkpoint": lambda d, e=every: keras.callbacks.OrbaxCheckpoint(
                    str(d), save_freq=e
                ),
                "per_step_hook": lambda d: per_step_hook(),
            }
            # Each callback's fit is paired with a fit without callbacks just
            # before it (the machine's load drifts), in an order that rotates
            # from repeat to repeat (no callback always runs first or last).
            names = list(makers)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                make = makers[name]
                base = fit(steps, [])
                runs.setdefault("baseline", []).append({"fit": base, "before": name})
                d = work / f"{mode}-{name}-{r}"
                inner = make(d)
                timed = Timed(inner)
                end_parts = _time_end_parts(inner) if name == "ft" else {}
                elapsed = fit(steps, [timed])
                entry: dict[str, Any] = {
                    "fit": elapsed,
                    "baseline_fit": base,
                    "added_per_save": (elapsed - base) / saves,
                    "blocked_per_save": timed.blocked / saves,
                    "end_wait": timed.end,
                    # highest resident memory during fit above its start, in states
                    "extra_host_memory": peaks[-1] / state_bytes,
                }
                if name == "raw_floor":
                    entry["pipeline_per_save"] = _mean(inner.pipeline)
                if name == "ft":
                    stats, history = inner.stats, list(inner._pipeline.history)
                    entry.update(
                        commits=stats.commits,
                        moved_saves=stats.moved_saves,
                        moved_steps=stats.moved_steps,
                        pipeline_per_save=stats.commit_seconds / max(stats.commits, 1),
                        to_host_per_save=_mean([h["to_host"] for h in history]),
                        write_per_save=_mean([h["write"] for h in history]),
                        snapshot_where=inner._snapshotter.last_where,
                        end_release=end_parts.get("release", 0.0),
                        end_delete=end_parts.get("delete", 0.0),
                    )
                    inner._pipeline.history.clear()
                runs.setdefault(name, []).append(entry)
                shutil.rmtree(d, ignore_errors=True)
        result["modes"][mode] = {"every": every, "saves": saves, "steps": steps, "runs": runs}
        _partial(result)
        if mode == modes[0]:
            samples = restores or max(repeats, RESTORE_SAMPLES)
            result["restore"] = restore(state_bytes, fit, work, samples)
            _partial(result)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _time_end_parts(callback: Any) -> dict[str, float]:
    """Time two parts of ft's end of `fit`: dropping the snapshot's reused host
    buffers, and deleting the backups (`delete_checkpoint=True`)."""
    parts: dict[str, float] = {}
    for part, owner, method in (
        ("release", callback._snapshotter, "release"),
        ("delete", callback._store, "delete"),
    ):
        original = getattr(owner, method)

        def timed(*args: Any, _part: str = part, _original: Any = original) -> Any:
            start = time.perf_counter()
            try:
                return _original(*args)
            finally:
                parts[_part] = parts.get(_part, 0.0) + time.perf_counter() - start

        setattr(owner, method, timed)
    return parts


def warm_up(work: Path) -> None:
    """First saves pay for imports and thread pools once per process: pay them here."""
    import keras

    import ft

    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    model.compile("adam", "mse")
    x = np.zeros((16, 8), "float32")
    for callback in [
        ft.BackupAndRestore(work / "ft", save_freq=1, async_save=True),
        keras.callbacks.BackupAndRestore(str(work / "br"), save_freq=1),
        keras.callbacks.OrbaxCheckpoint(str(work / "orbax"), save_freq=1),
    ]:
        model._initial_epoch = None
        model.fit(x, x[:, :4], batch_size=8, epochs=1, callbacks=[callback], verbose=0)
    shutil.rmtree(work, ignore_errors=True)


def restore(state_bytes: int, fit: Any, work: Path, samples: int) -> dict[str, list[float]]:
    """Restore time (`on_train_begin`, inside `fit`) against a cold read of the same files.

    `samples` of each (a few seconds each): one cold read or restore varies by up
    to 2 x on a shared virtual machine, and the tables take medians. ft's restore
    comes first in the first sample: the first restore of the process. Beside
    them, a new process's first write to `state_bytes` of new memory (`fresh_memory`).
    """
    out: dict[str, list[float]] = {"fresh_memory": [fresh_memory(state_bytes)]}
    for r in range(samples):
        names = ["ft", "keras_backup_and_restore"]
        for name in names[r % 2 :] + names[: r % 2]:
            d = work / f"restore-{name}-{r}"
            fit(1, [_restoring(name, d)])  # one step, one backup
            out.setdefault(f"{name}_cold_read", []).append(cold_read(d))
            drop_caches()
            timed = Timed(_restoring(name, d))
            fit(1, [timed])
            out.setdefault(f"{name}_restore", []).append(timed.begin)
            shutil.rmtree(d, ignore_errors=True)
    out["cache_dropped"] = [float(drop_caches())]
    return out


def _restoring(name: str, directory: Path) -> Any:
    import keras

    import ft

    if name == "ft":
        return ft.BackupAndRestore(directory, save_freq=1, delete_checkpoint=False)
    return keras.callbacks.BackupAndRestore(str(directory), save_freq=1, delete_checkpoint=False)


def _host_view_nbytes(value: Any) -> int:
    from keras import backend

    itemsize = np.dtype(backend.standardize_dtype(value.dtype)).itemsize
    return int(np.prod(value.shape, dtype=np.int64)) * itemsize


def _partial(result: dict[str, Any]) -> None:
    """What is measured so far, for a run that may be cut short (`FT_BENCH_PARTIAL`)."""
    path = os.environ.get("FT_BENCH_PARTIAL")
    if path:
        Path(path).write_text(json.dumps(result, indent=1) + "\n")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
