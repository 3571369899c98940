"""Smoke tests: every example runs as the README says, with short settings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import ROOT, engine_env

pytestmark = pytest.mark.slow


def run(backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, *args],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_resume_demo() -> None:
    proc = run("jax", "multiworker_examples/resume_demo.py", "--backend", "jax")
    assert "resumed at epoch 1, batch 11 (step 40)" in proc.stdout
    assert "final weights identical to the uninterrupted run: True" in proc.stdout


def test_fault_demo_tensorflow_sigkill() -> None:
    proc = run(
        "tensorflow",
        "multiworker_examples/fault_demo.py",
        "--backend",
        "tensorflow",
        "--epochs",
        "2",
    )
    assert "restarting the group (1 of 2)" in proc.stdout
    assert "[worker 1] ft [process=1] INFO: restored epoch 1, batch 10 (step 35)" in proc.stdout
    assert "final weights identical: True" in proc.stdout


def test_fault_demo_jax_preemption() -> None:
    proc = run(
        "jax",
        "multiworker_examples/fault_demo.py",
        "--backend",
        "jax",
        "--sigterm",
        "--epochs",
        "2",
    )
    assert "preempted: saved at step 42" in proc.stdout
    assert "[worker 0] ft [process=0] INFO: restored epoch 1, batch 17 (step 42)" in proc.stdout
    assert "final weights identical: True" in proc.stdout
