"""What a backup costs a JAX multi-host run: every process writing its own shards.

    python benchmarks/multihost_overhead.py [--width 2048] [--layers 3] [--steps 60]
        [--every 10] [--repeats 2] [--out DIR]

Two JAX processes on this machine (`ft.testing.run`, one CPU device each), a
Dense stack whose kernels are split over the processes (`ModelParallel`), Adam.
Each process runs, in the same run and rotating the order from repeat to
repeat, `fit` without callbacks (the baseline before each) and with:

- `raw floor`: each process copies its own shards to host on the training
  thread, then writes their raw bytes, fsyncs and renames on a thread of its
  own; one save in flight;
- `ft synchronous`: `ft.BackupAndRestore(async_save=False)`, every process
  writing its shards through Orbax on the training thread (ft before this
  change wrote every multi-host backup this way);
- `ft background`: `ft.BackupAndRestore(async_save=True)` (the default for
  states of 32 MiB and more): a device copy at the save's step, each
  process's pipeline thread writing its shards;
- `keras OrbaxCheckpoint`: `keras.callbacks.OrbaxCheckpoint` (Orbax's
  asynchronous multi-host save of `get_state_tree()`).

Per save: the time the training thread was blocked inside the callback's
hooks (its `on_train_end` included) and the time added to `fit` against the
baseline, in seconds and as a ratio to the raw floor; then the time ft's
restore of the last background backup takes at the start of `fit` against a
read of the files each process reads, page cache warm. Medians over repeats of
worker 0's numbers (worker 1's are in the JSON). No timed unit test: a smoke
test runs it at a tiny size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.overhead_harness import Timed, train_end_clock, write_raw

MODES = ["raw floor", "ft synchronous", "ft background", "keras OrbaxCheckpoint"]
INPUTS = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--width", type=int, default=2048, help="units of each Dense layer")
    parser.add_argument("--layers", type=int, default=3, help="hidden Dense layers")
    parser.add_argument("--steps", type=int, default=60, help="training steps per fit")
    parser.add_argument("--every", type=int, default=10, help="a save every this many steps")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="directory for the JSON and the table")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        _worker(args)
        return
    import ft.testing

    out = args.out or Path(tempfile.mkdtemp(prefix="ft-multihost-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ft-multihost-", dir=os.environ.get("FT_BENCH_DIR")))
    passed = [
        *("--width", str(args.width), "--layers", str(args.layers), "--steps", str(args.steps)),
        *("--every", str(args.every), "--repeats", str(args.repeats)),
        *("--worker", str(work)),
    ]
    try:
        result = ft.testing.run(__file__, num_workers=2, args=passed, backend="jax", timeout=3000)
        if result.exit_code != 0:
            raise SystemExit(f"the benchmark's job failed:\n{result.tail()}")
        workers = [json.loads((work / f"worker-{i}.json").read_text()) for i in (0, 1)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = _table(workers[0], args)
    (out / "benchmark-multihost.json").write_text(json.dumps(workers, indent=1))
    (out / "benchmark-multihost.md").write_text(table)
    print(table)


def _table(result: dict[str, Any], args: argparse.Namespace) -> str:
    saves = result["saves_per_fit"]
    median = {
        mode: {key: float(np.median([r[key] for r in runs])) for key in runs[0]}
        for mode, runs in result["runs"].items()
    }
    floor = median["raw floor"]["added"] / saves
    lines = [
        f"2 JAX processes, {result['state_bytes'] / 1e6:.0f} MB of state "
        f"({result['local_bytes'] / 1e6:.0f} MB written by each process), "
        f"{args.steps} steps, a save every {args.every} ({saves} per fit), "
        f"step {result['step_seconds'] * 1e3:.0f} ms, medians of {args.repeats} "
        "(worker 0):",
        "",
        "| callback | blocked / save | added to fit / save | added / raw floor |",
        "|---|---|---|---|",
    ]
    for mode in MODES:
        m = median.get(mode)
        if m is None:
            lines.append(f"| {mode} | failed: {result['failed'].get(mode, '?')} | | |")
            continue
        added = m["added"] / saves
        ratio = f"{added / floor:.2f}" if floor > 0 else "-"
        lines.append(f"| {mode} | {m['blocked'] / saves:.3f} s | {added:.3f} s | {ratio} |")
    restore = result["restore"]
    lines += [
        "",
        f"ft restore (start of fit, page cache warm): {np.median(restore['ft']):.3f} s; "
        f"reading the files this process reads: {np.median(restore['read']):.3f} s "
        f"({np.median(restore['ft']) / max(np.median(restore['read']), 1e-9):.2f} x)",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ worker side
def _worker(args: argparse.Namespace) -> None:
    import ft

    ft.strategies.initialize()  # jax.devices() is now global
    ft.strategies.auto(layout_map=_layout())
    import jax

    index = jax.process_index()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64 * args.steps, INPUTS)).astype("float32")
    y = rng.normal(size=(64 * args.steps, 1)).astype("float32")
    model = _model(args)
    work: Path = args.worker

    def fit(callbacks: list[Any], steps: int) -> float:
        clock = train_end_clock()
        start = time.perf_counter()
        model.fit(
            x[: 64 * steps],
            y[: 64 * steps],
            batch_size=64,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=[*callbacks, clock],
        )
        return clock.at - start

    fit([], 2)  # compiles
    state = [v.value for v in model.variables + model.optimizer.variables]
    state_bytes = sum(int(v.nbytes) for v in state)
    local_bytes = sum(_local_bytes(v) for v in state)  # read before fit donates them
    runs: dict[str, list[dict[str, float]]] = {}
    failed: dict[str, str] = {}
    for repeat in range(args.repeats):
        order = MODES[repeat % len(MODES) :] + MODES[: repeat % len(MODES)]
        for mode in order:
            base = fit([], args.steps)
            directory = work / f"{mode.replace(' ', '-')}-{repeat}"
            try:
                callback = _callback(mode, directory, args.every, index)
            except Exception as e:  # a comparator that cannot run here
                failed[mode] = f"{type(e).__name__}: {e}"[:200]
                continue
            timed = Timed(callback)
            try:
                seconds = fit([timed], args.steps)
            except Exception as e:
                failed[mode] = f"{type(e).__name__}: {e}"[:200]
                continue
            runs.setdefault(mode, []).append(
                {"added": seconds - base, "blocked": timed.blocked + timed.end, "fit": seconds}
            )
            if mode != "ft background" or repeat != args.repeats - 1:
                _remove(directory, index)
    kept = work / f"ft-background-{args.repeats - 1}"
    restore: dict[str, list[float]] = {"ft": [], "read": []}
    for _ in range(3):
        timed = Timed(ft.BackupAndRestore(kept, save_freq=10**9, delete_checkpoint=False))
        fit([timed], 1)
        restore["ft"].append(timed.begin)
        restore["read"].append(_read_files(kept, index))
    base = fit([], args.steps)
    result = {
        "runs": runs,
        "failed": failed,
        "restore": restore,
        "saves_per_fit": args.steps // args.every,
        "step_seconds": base / args.steps,
        "state_bytes": state_bytes,
        "local_bytes": local_bytes,
    }
    (work / f"worker-{index}.json").write_text(json.dumps(result))


def _layout() -> Any:
    import jax
    import keras

    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((1, len(devices)), ("batch", "model"), devices)
    layout = keras.distribution.LayoutMap(mesh)
    layout[".*dense.*/kernel"] = (None, "model")
    return layout


def _model(args: argparse.Namespace) -> Any:
    import keras

    keras.utils.set_random_seed(1)
    layers = [keras.Input((INPUTS,))]
    layers += [keras.layers.Dense(args.width, activation="relu") for _ in range(args.layers)]
    layers.append(keras.layers.Dense(2))  # split over the 2 processes too
    model = keras.Sequential(layers)
    model.compile(keras.optimizers.Adam(1e-3), loss="mse")
    return model


def _callback(mode: str, directory: Path, every: int, index: int) -> Any:
    import keras

    import ft

    if mode == "raw floor":
        return raw_floor_of_shards(directory / f"process_{index}", every)
    if mode == "ft synchronous":
        return ft.BackupAndRestore(directory, save_freq=every, async_save=False)
    if mode == "ft background":
        return ft.BackupAndRestore(
            directory, save_freq=every, delete_checkpoint=False, async_save=True
        )
    return keras.callbacks.OrbaxCheckpoint(str(directory), save_freq=every)


def _remove(directory: Path, index: int) -> None:
    """Remove a mode's files once every process is done with them."""
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"remove {directory.name}")
    if index == 0:
        shutil.rmtree(directory, ignore_errors=True)


def _local_bytes(value: Any) -> int:
    """Bytes of `value` that this process writes: its shards with replica id 0."""
    return sum(int(s.data.nbytes) for s in value.addressable_shards if s.replica_id == 0)


def _read_files(directory: Path, index: int) -> float:
    """Seconds to read every file this process reads of an ft backup: the shared ones
    and its own process's."""
    start = time.perf_counter()
    for path in directory.rglob("*"):
        parts = path.relative_to(directory).parts
        other = any(p.startswith("ocdbt.process_") and p != f"ocdbt.process_{index}" for p in parts)
        if path.is_file() and not other:
            with open(path, "rb") as f:
                while f.read(8 << 20):
                    pass
    return time.perf_counter() - start


def raw_floor_of_shards(directory: Path, every: int) -> Any:
    """This process's shards to host on the training thread; raw bytes, fsync and rename
    on a thread of its own; one save in flight."""
    import keras

    class RawFloor(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.step = 0
            self.thread: threading.Thread | None = None
            directory.mkdir(parents=True, exist_ok=True)

        # At the next step's begin, as ft does from fit's CallbackList: a callback
        # with an on_train_batch_end makes Keras wait for every step's logs.
        def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
            done, self.step = self.step, self.step + 1
            if done and done % every == 0:
                self._save(done)

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            if self.step % every == 0:
                self._save(self.step)

        def _save(self, step: int) -> None:
            if self.thread is not None:
                self.thread.join()
            state = [v.value for v in self.model.variables + self.model.optimizer.variables]
            shards = [
                np.array(s.data, copy=True)
                for v in state
                for s in v.addressable_shards
                if s.replica_id == 0
            ]
            self.thread = threading.Thread(target=write_raw, args=(directory, shards, step))
            self.thread.start()

        def on_train_end(self, logs: Any = None) -> None:
            if self.thread is not None:
                self.thread.join()

    return RawFloor()


if __name__ == "__main__":
    main()
