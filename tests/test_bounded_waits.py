"""Every wait is bounded, with an error naming what it waited for (issue 11, point 5)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import keras
import pytest

import ft
from ft import errors, launch
from tests import helpers


class _StuckProcess:
    pid = 4242
    returncode = None

    def poll(self) -> None:
        return None

    def wait(self, timeout: float | None = None) -> int:
        assert timeout is not None, "the launcher waited without a bound"
        raise subprocess.TimeoutExpired("worker", timeout)


def test_launcher_wait_for_a_worker_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "_signal_group", lambda proc, sig: None)
    monkeypatch.setattr(launch, "KILL_WAIT_SECONDS", 0.01)
    launcher = launch.Launcher(1, ["x.py"], max_restarts=0, grace_period=0.01)
    launcher._procs = [_StuckProcess()]  # type: ignore[list-item]
    with pytest.raises(errors.ProcessExitTimeoutError, match=r"worker 0 \(pid 4242\) did not exit"):
        launcher._stop_all()


def test_tensorflow_collectives_get_a_finite_timeout_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ft.strategies import tensorflow as tf_adapter

    seen: dict = {}
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    monkeypatch.setattr(tf_adapter, "multi_worker_strategy", lambda cluster, **kw: seen.update(kw))
    config = {"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    ft.strategies.auto()
    assert seen["collective_timeout"] == ft.strategies.DEFAULT_TIMEOUT
    ft.strategies.auto(collective_timeout=7)
    assert seen["collective_timeout"] == 7


def test_mwms_patches_can_be_removed() -> None:
    from keras.src.backend.tensorflow import trainer as tf_trainer

    from ft.strategies import keras_mwms_patch

    original = tf_trainer.reduce_per_replica
    assert keras_mwms_patch.apply()
    assert tf_trainer.reduce_per_replica is not original
    keras_mwms_patch.remove()
    keras_mwms_patch.remove()
    assert tf_trainer.reduce_per_replica is original


@pytest.mark.slow
def test_tensorflow_step_waiting_for_a_stalled_worker_fails_at_the_collective_timeout(
    tmp_path: Path,
) -> None:
    """Worker 1 sleeps inside fit, alive: the heartbeat cannot see it, the collective
    timeout ends worker 0's step with an error that says what it waited for."""
    result = helpers.job(
        "tensorflow",
        tmp_path / "w{index}.npz",
        *("--collective-timeout", "5", "--backup-dir", str(tmp_path / "b"), "--save-freq", "5"),
        *("--stall-at-step", "10", "--kill-worker", "1"),
    )
    assert result.exit_code != 0
    assert "stalling" in result.workers[1].lines
    assert (
        "ft.errors.BarrierTimeoutError: A training step on worker 0 (its collective "
        "with every other worker) did not complete in time" in result.workers[0].output
    ), result.tail()
