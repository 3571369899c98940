"""What one save's write costs the machine: wall time, user and system CPU, ft against raw.

    python benchmarks/save_cpu.py [--size 25M] [--writes 15]

On 2 cores a background save competes with training for the CPU, so its CPU
time is what training runs without. This writes the same host arrays (the
state of `checkpoint_overhead.py`'s Dense stack: parameters and Adam's two
slots) again and again, alone in this process, and measures each write with
`getrusage`:

- `raw write`: the raw floor's work, one `write` of each array into one file,
  fsync, rename, fsync of the directory;
- `ft store write`: `PosixStore.write`, all of ft's background save after the
  snapshot (crc32c of every array, Orbax/TensorStore, fsync of every file,
  the record, the commit rename).

The two alternate, each write into a new directory removed afterwards (as a
backup replaced by the next one is), after an `os.sync()`. Prints the median
and the mean of the faster half of each: on a virtual machine the same write
of either kind takes 2-5 x longer now and then, nearly all of it system time
(first writes to memory the host took back), and the faster half shows what
each kind of write costs when that does not happen.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np
from overhead_harness import INPUTS, SIZES


def state(size: str) -> dict[str, list[np.ndarray]]:
    """Host arrays the size of the Dense stack's parameters and Adam's two slots."""
    width, layers = SIZES[size]
    shapes = [(INPUTS, width), (width,)] + [(width, width), (width,)] * (layers - 1)
    shapes += [(width, 10), (10,)]
    rng = np.random.default_rng(0)
    return {"state": [rng.normal(size=s).astype("float32") for s in shapes for _ in range(3)]}


def raw_write(directory: str, arrays: dict[str, list[np.ndarray]]) -> None:
    os.makedirs(directory)
    path = os.path.join(directory, "state.tmp")
    with open(path, "wb") as f:
        for array in arrays["state"]:
            f.write(memoryview(array).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    os.rename(path, os.path.join(directory, "state"))
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ft_write(directory: str, arrays: dict[str, list[np.ndarray]]) -> None:
    from ft.metadata import BackupRecord
    from ft.store.posix import PosixStore

    record = BackupRecord(
        epoch=0,
        batch=1,
        step=1,
        data_position=1,
        backend="numpy",
        num_processes=1,
        written_at="",
        variables={},
    )
    PosixStore(directory).write(record, arrays)


def measure(write, directory: str, arrays) -> tuple[float, float, float]:
    """Wall, user and system seconds of one write into the new `directory`."""
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    write(directory, arrays)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="25M")
    parser.add_argument("--writes", type=int, default=15)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = parser.parse_args()
    arrays = state(args.size)
    nbytes = sum(a.nbytes for a in arrays["state"])
    root = tempfile.mkdtemp(prefix="ft-save-cpu-", dir=args.dir)
    kinds = {"raw write": raw_write, "ft store write": ft_write}
    samples: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in kinds}
    try:
        for kind, write in kinds.items():  # warm-up: imports, first allocations
            write(os.path.join(root, f"warm-{len(kind)}"), arrays)
        for i in range(args.writes):
            order = list(kinds) if i % 2 == 0 else list(reversed(kinds))
            for kind in order:
                directory = os.path.join(root, f"{i}-{len(kind)}")
                os.sync()
                time.sleep(0.3)
                samples[kind].append(measure(kinds[kind], directory, arrays))
                shutil.rmtree(directory)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.size}: {nbytes / 2**20:.0f} MiB of state, {args.writes} writes of each kind")
    print("| write | wall | user | system | faster half: wall | user | system |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for kind, values in samples.items():
        table = np.array(values)
        median = np.median(table, axis=0)
        faster = table[np.argsort(table[:, 0])[: max(1, len(table) // 2)]].mean(axis=0)
        rows[kind] = (median, faster)
        cells = " | ".join(f"{v:.3f} s" for v in (*median, *faster))
        print(f"| {kind} | {cells} |")
    (raw_median, raw_faster), (ft_median, ft_faster) = rows["raw write"], rows["ft store write"]
    print(
        f"ft / raw, wall: {ft_median[0] / raw_median[0]:.2f} (median), "
        f"{ft_faster[0] / raw_faster[0]:.2f} (faster half); CPU (user + system): "
        f"{ft_median[1:].sum() / raw_median[1:].sum():.2f}, "
        f"{ft_faster[1:].sum() / raw_faster[1:].sum():.2f}"
    )


if __name__ == "__main__":
    main()
