"""Run `tests/scenario.py` in a process of its own and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

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


def launch(backend: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m ft.launch ARGS` on `backend`, from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", "ft.launch", *args],
        env=engine_env(backend, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def kill_peer_and_time_survivor(
    backend: str, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """Two workers; worker 1 SIGKILLs itself at step 10; no restart, a 120 s grace
    period and a worker 0 that ignores SIGTERM, so only failure detection can end
    worker 0. Returns the launcher's result and its wall time."""
    start = time.monotonic()
    proc = launch(
        backend,
        "-n",
        "2",
        "--grace-period",
        "120",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--backup-dir",
        str(tmp_path / "b"),
        "--save-freq",
        "5",
        "--kill-at-step",
        "10",
        "--kill-worker",
        "1",
        "--ignore-sigterm",
        "--out",
        str(tmp_path / "w{index}.npz"),
        timeout=200,
    )
    return proc, time.monotonic() - start
