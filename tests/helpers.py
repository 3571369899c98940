"""Run `tests/scenario.py` in a process of its own (or as a 2-worker job through
`ft.testing.run`) and read what it wrote."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

import ft.testing

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "scenario.py"


# On the path of the processes that run ft's own test scripts: hides scikit-learn,
# which Keras imports (for `keras.wrappers`) where it is installed and none of
# those scripts uses (tests/no_sklearn/sklearn/__init__.py).
NO_SKLEARN = ROOT / "tests" / "no_sklearn"


def engine_env(backend: str, sklearn: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment for a test process on `backend`; without `sklearn`,
    scikit-learn is hidden from it (`NO_SKLEARN`)."""
    env = dict(os.environ)
    path = [str(ROOT)] if sklearn else [str(NO_SKLEARN), str(ROOT)]
    env.update(
        KERAS_BACKEND=backend,
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([*path, env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def run_scenario(
    backend: str, out: Path, *args: str, expect_rc: int | None = 0, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the scenario; assert on its exit code unless `expect_rc` is None."""
    proc = subprocess.run(
        [sys.executable, str(SCENARIO), "--out", str(out), *args],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if expect_rc is not None:
        assert proc.returncode == expect_rc, (
            f"scenario exited {proc.returncode}, expected {expect_rc}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
        )
    return proc


def weights(out: Path) -> dict[str, np.ndarray]:
    with np.load(out, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def report(out: Path) -> dict[str, Any]:
    return json.loads(Path(str(out) + ".json").read_text())


def assert_same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def job(
    backend: str,
    out: Path,
    *args: str,
    max_restarts: int = 0,
    grace_period: float = 3.0,
    timeout: float = 300,
) -> ft.testing.JobResult:
    """The scenario as a 2-worker job under `ft.strategies.auto()`, through
    `ft.testing.run`; worker i writes `out` with `{index}` replaced by i."""
    return ft.testing.run(
        SCENARIO,
        num_workers=2,
        args=["--strategy", "auto", "--out", str(out), *args],
        backend=backend,
        max_restarts=max_restarts,
        grace_period=grace_period,
        timeout=timeout,
        env={"PYTHONPATH": os.pathsep.join([str(NO_SKLEARN), os.environ.get("PYTHONPATH", "")])},
        directory=out.parent / f"job-{time.monotonic_ns()}",
    )


class References:
    """Uninterrupted runs of the scenario, each run once per test session.

    Once for every pytest-xdist worker of the session, not once per worker:
    the first worker that asks for a run makes it in `directory` (shared by
    the workers) under a file lock; the others wait for it, at most
    `_REFERENCE_WAIT` seconds, and read what it wrote.
    """

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._weights: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

    def __call__(self, backend: str, *extra: str) -> dict[str, np.ndarray]:
        """A 2-worker job's final weights, worker 0's (worker 1's are checked to be the same)."""
        key = ("job", backend, *extra)
        if key not in self._weights:

            def make(out: Path) -> None:
                result = job(backend, out / "w{index}.npz", "--no-backup", *extra)
                assert result.exit_code == 0, result.tail()
                # The replicas agree in an uninterrupted run.
                assert_same_weights(weights(out / "w0.npz"), weights(out / "w1.npz"))

            self._weights[key] = weights(self._once(key, make) / "w0.npz")
        return self._weights[key]

    def single(self, backend: str, *extra: str) -> Path:
        """The file a single-process run wrote (its weights; its report beside it)."""

        def make(out: Path) -> None:
            run_scenario(backend, out / "run.npz", "--no-backup", *extra)

        return self._once(("single", backend, *extra), make) / "run.npz"

    def _once(self, key: tuple[str, ...], make: Callable[[Path], None]) -> Path:
        """The directory `make` filled for `key`, made by the first worker that asks."""
        name = hashlib.sha256("\0".join(key).encode()).hexdigest()[:16]
        out = self._directory / name
        with _locked(self._directory / f"{name}.lock", _REFERENCE_WAIT):
            if not (out / _MADE).exists():
                shutil.rmtree(out, ignore_errors=True)  # a worker's failed try
                out.mkdir()
                make(out)
                (out / _MADE).touch()
        return out


# A reference run takes under a minute (a job is stopped after 300 s); another
# worker waits at most this for one.
_REFERENCE_WAIT = 400.0
_MADE = "made"


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with open(path, "a") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} still held after {timeout:.0f} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def kill_peer_and_time_survivor(
    backend: str, tmp_path: Path, *extra: str
) -> tuple[ft.testing.JobResult, float]:
    """Two workers; worker 1 is SIGKILLed before step 10; no restart, a 120 s grace
    period and a worker 0 that ignores SIGTERM, so only failure detection can end
    worker 0. `extra`: more scenario arguments. Returns the job's result and its
    wall time."""
    start = time.monotonic()
    result = job(
        backend,
        tmp_path / "w{index}.npz",
        "--backup-dir",
        str(tmp_path / "b"),
        "--save-freq",
        "5",
        "--kill-at-step",
        "10",
        "--kill-worker",
        "1",
        "--ignore-sigterm",
        *extra,
        grace_period=120,
        timeout=200,
    )
    return result, time.monotonic() - start
