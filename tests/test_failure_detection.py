"""A frozen peer (SIGSTOP) is detected within the configured heartbeat, never a hang."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import ft.testing
from tests import helpers

pytestmark = pytest.mark.slow

HEARTBEAT = 5.0


def freeze_worker_1(engine: str, tmp_path: Path) -> tuple[float | None, ft.testing.JobResult]:
    """Seconds from worker 1's SIGSTOP to worker 0's first error line, and the job's result."""
    result = helpers.job(
        engine,
        tmp_path / "w{index}.npz",
        *("--heartbeat", str(HEARTBEAT), "--backup-dir", str(tmp_path / "b"), "--save-freq", "5"),
        *("--sigstop-at-step", "10", "--kill-worker", "1"),
        grace_period=5,
        timeout=180,
    )
    frozen, survivor = result.workers[1], result.workers[0]
    stopped = next(
        (
            t
            for t, line in zip(frozen.times, frozen.lines, strict=True)
            if line == "step 10"  # printed right before the freeze
        ),
        None,
    )
    if stopped is None:
        return None, result
    detected = next(
        (
            t - stopped
            for t, line in zip(survivor.times, survivor.lines, strict=True)
            if t >= stopped and ("Error" in line or "unhealthy" in line)
        ),
        None,
    )
    return detected, result


def test_tensorflow_survivor_raises_peer_lost_naming_the_frozen_worker(tmp_path: Path) -> None:
    detected, result = freeze_worker_1("tensorflow", tmp_path)
    assert result.exit_code != 0
    assert re.search(
        r"ft\.errors\.PeerLostError: A training step on worker 0 .*failed because worker 1",
        result.workers[0].output,
    ), result.tail()
    # Detected and ended by itself (else the job times out); how fast depends on
    # the machine's load as well as the heartbeat, so no time is asserted.
    assert detected is not None


def test_jax_survivor_is_stopped_by_the_heartbeat(tmp_path: Path) -> None:
    """JAX's coordination client terminates the survivor itself (SIGABRT) and names
    the unhealthy task; ft cannot turn that into a Python error, but it is bounded."""
    detected, result = freeze_worker_1("jax", tmp_path)
    assert result.exit_code != 0
    assert "unhealthy" in result.output, result.tail()
    # Detected and ended by itself (else the job times out); how fast depends on
    # the machine's load as well as the heartbeat, so no time is asserted.
    assert detected is not None
