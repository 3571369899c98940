"""A frozen peer (SIGSTOP) is detected within the configured heartbeat, never a hang."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, SCENARIO, engine_env

pytestmark = pytest.mark.slow

HEARTBEAT = 5.0


def freeze_worker_1(engine: str, tmp_path: Path) -> tuple[float | None, list[str], int]:
    """Seconds from worker 1's SIGSTOP to worker 0's first error line, the output, the exit code."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ft.launch",
            "-n",
            "2",
            "--grace-period",
            "5",
            str(SCENARIO),
            "--strategy",
            "auto",
            "--heartbeat",
            str(HEARTBEAT),
            "--backup-dir",
            str(tmp_path / "b"),
            "--save-freq",
            "5",
            "--sigstop-at-step",
            "10",
            "--kill-worker",
            "1",
            "--out",
            str(tmp_path / "w{index}.npz"),
        ],
        env=engine_env(engine, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    stopped, detected, lines = None, None, []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("[worker 1] step 10"):
            stopped = time.monotonic()
        if (
            stopped
            and detected is None
            and line.startswith("[worker 0]")
            and ("Error" in line or "unhealthy" in line)
        ):
            detected = time.monotonic() - stopped
    return detected, lines, proc.wait(timeout=120)


def test_tensorflow_survivor_raises_peer_lost_naming_the_frozen_worker(tmp_path: Path) -> None:
    detected, lines, code = freeze_worker_1("tensorflow", tmp_path)
    text = "".join(lines)
    assert code != 0
    assert (
        "[worker 0] ft.errors.PeerLostError: A training step on worker 0 failed because worker 1"
        in text
    )
    # Detected and ended by itself (else proc.wait times out); how fast depends on
    # the machine's load as well as the heartbeat, so no time is asserted.
    assert detected is not None


def test_jax_survivor_is_stopped_by_the_heartbeat(tmp_path: Path) -> None:
    """JAX's coordination client terminates the survivor itself (SIGABRT) and names
    the unhealthy task; ft cannot turn that into a Python error, but it is bounded."""
    detected, lines, code = freeze_worker_1("jax", tmp_path)
    text = "".join(lines)
    assert code != 0
    assert "unhealthy" in text
    # Detected and ended by itself (else proc.wait times out); how fast depends on
    # the machine's load as well as the heartbeat, so no time is asserted.
    assert detected is not None
