"""ft.BackupAndRestore against Keras's own callbacks and the machine's limits, in one run.

    python benchmarks/checkpoint_overhead.py [--sizes 1M 25M 100M] [--backends tensorflow jax]
                                             [--repeats 3] [--out docs]

For each backend and model size (Dense stacks with Adam: the state is 3 x the
parameters in float32), a fresh process measures, `--repeats` times each:

- extra seconds per save added to `fit`: a fit of N steps saving every F
  steps, minus the same fit without callbacks, divided by the saves; for
  `keras.callbacks.BackupAndRestore`, `keras.callbacks.OrbaxCheckpoint` and
  `ft.BackupAndRestore` (whose saves go to the background at this size);
- the machine's limits on the same bytes: a memcpy of the state, and a write
  + fsync of it;
- restore time: a `fit` that only restores (no epoch left), minus an empty
  `fit`, for ft and Keras's BackupAndRestore; and a read of every backup file
  after dropping the page cache (cold when the kernel lets us drop it);
- peak extra memory while saving: the highest RSS during the fit, sampled
  every 2 ms, minus the highest RSS of the same fit without callbacks.

It prints the minimum and median of each, a table of ratios, and writes
`benchmark-results.md` and `benchmark.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"1M": (1000, 1), "25M": (2500, 4), "100M": (5000, 4)}  # width, hidden layers
# Saves after steps 10 and 20; the 5 steps after the last one let a background
# save finish before `fit` ends, as it would in a long run.
STEPS, EVERY = 25, 10
REALISTIC_EVERY = 100  # steps between saves for the "fit overhead" column


# ---------------------------------------------------------------- the child
class PeakRSS:
    """Highest resident set size while the block runs, sampled every 2 ms."""

    def __enter__(self) -> PeakRSS:
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def child(size: str, repeats: int) -> dict[str, Any]:
    import keras
    import numpy as np

    import ft

    width, layers = SIZES[size]
    keras.utils.set_random_seed(0)

    def model() -> Any:
        m = keras.Sequential(
            [keras.Input((1024,))]
            + [keras.layers.Dense(width, activation="relu", name=f"h{i}") for i in range(layers)]
            + [keras.layers.Dense(10, name="out")]
        )
        m.compile(keras.optimizers.Adam(1e-4), "mse")
        return m

    x = np.random.default_rng(0).normal(size=(8 * STEPS, 1024)).astype("float32")
    y = np.zeros((8 * STEPS, 10), "float32")
    m = model()
    m.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0)  # compile, build the optimizer
    state = [np.asarray(keras.ops.convert_to_numpy(v)) for v in m.variables + m.optimizer.variables]
    nbytes = sum(a.nbytes for a in state)
    work = Path(tempfile.mkdtemp(prefix="ft-bench-", dir=os.environ.get("FT_BENCH_DIR")))
    out: dict[str, list[float]] = {}

    def timed_fit(callbacks: list[Any], epochs: int = 1) -> tuple[float, int]:
        m._initial_epoch = None  # Keras's BackupAndRestore leaves it set after a restore
        before = _rss()
        with PeakRSS() as peak:
            start = time.perf_counter()
            m.fit(x, y, batch_size=8, epochs=epochs, callbacks=callbacks, verbose=0)
            elapsed = time.perf_counter() - start
        return elapsed, peak.peak - before

    makers = {
        "keras_backup_and_restore": lambda d: keras.callbacks.BackupAndRestore(d, save_freq=EVERY),
        "keras_orbax_checkpoint": lambda d: keras.callbacks.OrbaxCheckpoint(d, save_freq=EVERY),
        "ft": lambda d: ft.BackupAndRestore(d, save_freq=EVERY),
    }
    saves = STEPS // EVERY
    for r in range(repeats):
        base, base_peak = timed_fit([])
        out.setdefault("fit_seconds", []).append(base)
        for name, make in makers.items():
            d = work / f"{name}-{r}"
            t, peak = timed_fit([make(str(d))])
            out.setdefault(f"{name}_per_save", []).append((t - base) / saves)
            out.setdefault(f"{name}_extra_memory", []).append(float(peak - base_peak))
            shutil.rmtree(d, ignore_errors=True)
        # Where ft's time goes, each stage alone and synchronous.
        from ft import training_state
        from ft.checkpoint_store import CheckpointStore
        from ft.metadata import BackupRecord

        variables = training_state.live_variables(m)
        start = time.perf_counter()
        arrays = training_state.snapshot(variables)
        out.setdefault("ft_stage_snapshot", []).append(time.perf_counter() - start)
        store = CheckpointStore(work / f"stages-{r}")
        store.prepare()
        tmp = store._new_tmp(1)
        start = time.perf_counter()
        store._write_arrays(tmp, arrays)
        out.setdefault("ft_stage_orbax_write", []).append(time.perf_counter() - start)
        record = BackupRecord(0, 0, 1, 0, keras.backend.backend(), 1, "", {"model": []})
        start = time.perf_counter()
        store._commit(tmp, store._final(1), record)
        out.setdefault("ft_stage_checksum_fsync_commit", []).append(time.perf_counter() - start)
        _drop_caches()
        start = time.perf_counter()
        found = store.latest()
        out.setdefault("ft_stage_verify", []).append(time.perf_counter() - start)
        assert found is not None
        target = training_state.restore_target(variables, training_state.manifest(variables))
        start = time.perf_counter()
        store.read_arrays(found[0], target)
        out.setdefault("ft_stage_orbax_read", []).append(time.perf_counter() - start)
        del arrays
        shutil.rmtree(work / f"stages-{r}", ignore_errors=True)
        # The machine's limits on the same bytes.
        buffers = [np.empty_like(a) for a in state]
        start = time.perf_counter()
        for dst, src in zip(buffers, state, strict=True):
            np.copyto(dst, src)
        out.setdefault("memcpy", []).append(time.perf_counter() - start)
        del buffers
        start = time.perf_counter()
        with open(work / "raw", "wb") as f:
            for a in state:
                f.write(memoryview(a).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        out.setdefault("write_fsync", []).append(time.perf_counter() - start)
        os.remove(work / "raw")
        # Restores: a fit with a backup and no epoch left, minus an empty fit.
        empty = min(timed_fit([], epochs=0)[0] for _ in range(2))
        for name in ("ft", "keras_backup_and_restore"):
            d = work / f"restore-{name}"
            m._initial_epoch = None
            if name == "ft":
                m.fit(
                    x[:8],
                    y[:8],
                    batch_size=8,
                    epochs=1,
                    verbose=0,
                    callbacks=[ft.BackupAndRestore(d, delete_checkpoint=False)],
                )
                cb: Any = ft.BackupAndRestore(d, delete_checkpoint=False)
            else:
                keras_cb = keras.callbacks.BackupAndRestore(str(d), delete_checkpoint=False)
                m.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0, callbacks=[keras_cb])
                cb = keras.callbacks.BackupAndRestore(str(d), delete_checkpoint=False)
            cold = _drop_caches()
            m._initial_epoch = None
            start = time.perf_counter()
            m.fit(x[:8], y[:8], batch_size=8, epochs=1, verbose=0, callbacks=[cb])
            out.setdefault(f"{name}_restore", []).append(time.perf_counter() - start - empty)
            if name == "ft":
                cold = _drop_caches()
                start = time.perf_counter()
                for path in d.rglob("*"):
                    if path.is_file():
                        with open(path, "rb") as f:
                            while f.read(8 << 20):
                                pass
                out.setdefault("cold_read", []).append(time.perf_counter() - start)
                out["cache_dropped"] = [float(cold)]
            shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"size": size, "params": int(m.count_params()), "state_bytes": nbytes, "runs": out}


# --------------------------------------------------------------- the parent
def _stats(values: list[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| backend | model | state | memcpy | write+fsync | Keras B&R / save | Keras Orbax / save "
        "| ft / save | ft / Keras B&R | ft / memcpy | ft restore | Keras B&R restore "
        "| cold read | ft restore / cold read | ft extra memory / state "
        f"| fit overhead, save every {REALISTIC_EVERY} steps: Keras B&R | ft |",
        "|" + "---|" * 17,
    ]
    for res in results:
        med = {k: _stats(v)[1] for k, v in res["runs"].items()}
        mn = {k: _stats(v)[0] for k, v in res["runs"].items()}
        gb = res["state_bytes"] / 1e9
        step = med["fit_seconds"] / STEPS
        ft_save = max(med["ft_per_save"], 0.0)
        rows.append(
            f"| {res['backend']} | {res['size']} ({res['params'] / 1e6:.0f}M) | {gb:.2f} GB "
            f"| {med['memcpy']:.3f} s | {med['write_fsync']:.3f} s "
            f"| {med['keras_backup_and_restore_per_save']:.3f} s "
            f"| {med['keras_orbax_checkpoint_per_save']:.3f} s "
            f"| {ft_save:.3f} s (min {mn['ft_per_save']:.3f}) "
            f"| {ft_save / max(med['keras_backup_and_restore_per_save'], 1e-9):.2f} "
            f"| {ft_save / max(med['memcpy'], 1e-9):.2f} "
            f"| {med['ft_restore']:.3f} s | {med['keras_backup_and_restore_restore']:.3f} s "
            f"| {med['cold_read']:.3f} s | {med['ft_restore'] / max(med['cold_read'], 1e-9):.2f} "
            f"| {med['ft_extra_memory'] / res['state_bytes']:.2f} "
            f"| {100 * med['keras_backup_and_restore_per_save'] / (REALISTIC_EVERY * step):.1f}% "
            f"| {100 * ft_save / (REALISTIC_EVERY * step):.1f}% |"
        )
    return "\n".join(rows)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["backend"] for r in results}), figsize=(12, 4.5))
    axes = axes if hasattr(axes, "__len__") else [axes]
    for ax, backend in zip(axes, sorted({r["backend"] for r in results}), strict=True):
        subset = [r for r in results if r["backend"] == backend]
        labels = [r["size"] for r in subset]
        series = [
            ("memcpy", "memcpy of the state"),
            ("write_fsync", "write + fsync"),
            ("keras_backup_and_restore_per_save", "keras BackupAndRestore"),
            ("keras_orbax_checkpoint_per_save", "keras OrbaxCheckpoint"),
            ("ft_per_save", "ft.BackupAndRestore"),
        ]
        width = 0.16
        for i, (key, label) in enumerate(series):
            values = [max(_stats(r["runs"][key])[1], 0.0) for r in subset]
            ax.bar([j + i * width for j in range(len(subset))], values, width, label=label)
        ax.set_xticks([j + 2 * width for j in range(len(subset))], labels)
        ax.set_yscale("log")
        ax.set_ylabel("seconds added to fit per save (median)")
        ax.set_title(f"{backend} backend")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.repeats)), flush=True)
        return
    results = []
    for backend in args.backends:
        for size in args.sizes:
            env = dict(
                os.environ,
                KERAS_BACKEND=backend,
                JAX_PLATFORMS="cpu",
                TF_CPP_MIN_LOG_LEVEL="3",
                PYTHONPATH=str(ROOT),
            )
            proc = subprocess.run(
                [sys.executable, __file__, "--child", size, "--repeats", str(args.repeats)],
                env=env,
                capture_output=True,
                text=True,
            )
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                raise SystemExit(f"{backend} {size} failed:\n{proc.stderr[-4000:]}")
            res = json.loads(line[0][7:])
            res["backend"] = backend
            results.append(res)
            print(f"{backend} {size}: done", flush=True)
    text = table(results) + "\n\n" + stages(results)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark-raw.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "benchmark-table.md").write_text(text + "\n")
    plot(results, out / "benchmark.png")
    print(f"wrote {out / 'benchmark-raw.json'} and {out / 'benchmark.png'}")


def stages(results: list[dict[str, Any]]) -> str:
    """Medians of ft's stages, each alone: where a save's and a restore's time goes."""
    rows = [
        "| backend | model | host snapshot | Orbax write | checksum + fsync + commit "
        "| verify (cold) | Orbax read | memcpy | write+fsync | cold read |",
        "|" + "---|" * 10,
    ]
    for res in results:
        med = {k: _stats(v)[1] for k, v in res["runs"].items()}
        rows.append(
            f"| {res['backend']} | {res['size']} | {med['ft_stage_snapshot']:.3f} s "
            f"| {med['ft_stage_orbax_write']:.3f} s "
            f"| {med['ft_stage_checksum_fsync_commit']:.3f} s "
            f"| {med['ft_stage_verify']:.3f} s | {med['ft_stage_orbax_read']:.3f} s "
            f"| {med['memcpy']:.3f} s | {med['write_fsync']:.3f} s | {med['cold_read']:.3f} s |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
