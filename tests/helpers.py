"""Run `tests/scenario.py` in a process of its own (or as a 2-worker job through
`ft.testing.run`) and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import ft.testing

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "tests" / "scenario.py"


def engine_env(backend: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KERAS_BACKEND=backend,
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
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
        directory=out.parent / f"job-{time.monotonic_ns()}",
    )


class References:
    """Uninterrupted 2-worker runs of the scenario, run once per backend and options."""

    def __init__(self, tmp_path_factory: Any) -> None:
        self._factory = tmp_path_factory
        self._weights: dict[tuple[str, ...], dict[str, np.ndarray]] = {}

    def __call__(self, backend: str, *extra: str) -> dict[str, np.ndarray]:
        """Worker 0's final weights (worker 1's are checked to be the same)."""
        key = (backend, *extra)
        if key not in self._weights:
            out = self._factory.mktemp("reference")
            result = job(backend, out / "w{index}.npz", "--no-backup", *extra)
            assert result.exit_code == 0, result.tail()
            ref0, ref1 = weights(out / "w0.npz"), weights(out / "w1.npz")
            assert_same_weights(ref0, ref1)  # the replicas agree in an uninterrupted run
            self._weights[key] = ref0
        return self._weights[key]


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
