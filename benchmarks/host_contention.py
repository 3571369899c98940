"""What a background save costs a training thread that is bound by its own Python.

    python benchmarks/host_contention.py [--mb 256] [--samples 7]

A GPU training step of a few milliseconds is bound by the host thread that
dispatches it: it needs the GIL for every step. This runs such a thread (a
jitted tiny step, dispatched and waited for, in a loop; JAX on the CPU) while
another thread does one part of a save of the same bytes, and prints the loop's
steps per second against an idle loop and the step time lost:

- `raw write`: the raw floor's work, one `write` of each array and an fsync;
- `ft store write`: `PosixStore.write`, all of ft's background save after the
  snapshot (crc32c of every array, Orbax/TensorStore, fsync, commit);
- `orbax write`: Orbax/TensorStore's part of it alone, no checksum, no fsync;
- `crc32c ft`: ft's checksum pass alone (google-crc32c's C library called
  through ctypes, which releases the GIL; `array_checksums`);
- `crc32c google extend`: the same bytes through google-crc32c's Python
  `extend`, 8 MiB per call, which holds the GIL (ft's path before, and its
  fallback where the C library cannot be called directly);
- `crc32c ICRAR`: the same bytes through the `crc32c` package (LGPL; not a
  dependency of ft), which releases the GIL while it computes, when installed.

Medians of `--samples`; the idle loop is measured before each part (this
machine's load drifts).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--mb", type=int, default=256, help="MiB of state, in 4 MiB arrays")
    parser.add_argument("--samples", type=int, default=7)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    from ft.metadata import BackupRecord
    from ft.store import array_checksums
    from ft.store import arrays as array_io
    from ft.store.posix import PosixStore

    rng = np.random.default_rng(0)
    arrays = {"model": [rng.random(1 << 20, dtype=np.float32) for _ in range(args.mb // 4)]}
    nbytes = sum(a.nbytes for a in arrays["model"])
    step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    x = jnp.ones((64, 64))
    step(x).block_until_ready()
    root = Path(tempfile.mkdtemp(prefix="ft-contention-", dir=os.environ.get("FT_BENCH_DIR")))
    store = PosixStore(root / "ft")
    store.prepare()
    checkpointer = array_io.new_checkpointer()
    count = [0]

    def raw_write() -> None:
        path = root / "raw.bin"
        with open(path, "wb") as f:
            for a in arrays["model"]:
                f.write(memoryview(a).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        path.unlink()

    def ft_write() -> None:
        count[0] += 1
        n = count[0]
        store.write(BackupRecord(0, n, n, n, "jax", 1, "now", {"model": []}), arrays)

    def orbax_write() -> None:
        count[0] += 1
        d = root / f"orbax-{count[0]}"
        d.mkdir()
        array_io.write(checkpointer, str(d / "arrays"), arrays, owner=str(d), chunk_crc=False)
        shutil.rmtree(d)

    def crc_ft() -> None:
        array_checksums.of_arrays(arrays)

    import google_crc32c

    def crc_google_extend() -> None:
        for a in arrays["model"]:
            flat = a.view(np.uint8)
            flat.flags.writeable = False  # `extend` takes read-only buffers only
            crc = 0
            for start in range(0, flat.size, array_checksums.PIECE):
                crc = google_crc32c.extend(crc, flat[start : start + array_checksums.PIECE])

    parts: dict[str, Callable[[], None]] = {
        "raw write": raw_write,
        "ft store write": ft_write,
        "orbax write": orbax_write,
        "crc32c ft": crc_ft,
        "crc32c google extend": crc_google_extend,
    }
    try:
        import crc32c  # type: ignore[import-not-found]

        views = [a.view(np.uint8) for a in arrays["model"]]

        def crc_icrar() -> None:
            for v in views:
                crc32c.crc32c(v)

        parts["crc32c ICRAR"] = crc_icrar
    except ImportError:
        pass

    def loop_during(work: Callable[[], None]) -> tuple[float, float]:
        """Steps per second of the loop while `work` runs once on another thread."""
        done = threading.Event()
        took = [0.0]

        def background() -> None:
            start = time.perf_counter()
            work()
            took[0] = time.perf_counter() - start
            done.set()

        steps = 0
        thread = threading.Thread(target=background)
        start = time.perf_counter()
        thread.start()
        while not done.is_set():
            step(x).block_until_ready()
            steps += 1
        elapsed = time.perf_counter() - start
        thread.join()
        return steps / elapsed, took[0]

    for work in parts.values():  # imports, thread pools, first files
        loop_during(work)
    print(f"{nbytes / 1e9:.2f} GB of state, medians of {args.samples}:")
    print(f"ft's crc32c releases the GIL here: {array_checksums.gil_free()}")
    print("| part of a save | its time | loop steps/s | x idle | step time lost |")
    print("|---|---|---|---|---|")
    for name, work in parts.items():
        idle, during, took = [], [], []
        for _ in range(args.samples):
            idle.append(loop_during(lambda: time.sleep(0.2))[0])
            rate, seconds = loop_during(work)
            during.append(rate)
            took.append(seconds)
        base, rate, seconds = (float(np.median(v)) for v in (idle, during, took))
        lost = max(0.0, 1 - rate / base) * seconds
        print(
            f"| {name} | {seconds:.3f} s | {rate:.0f} (idle {base:.0f}) | {rate / base:.2f} "
            f"| {lost:.3f} s |"
        )
    store.close()
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
