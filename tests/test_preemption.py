"""save_before_preemption: a real SIGTERM, a save at one agreed step, exit 42, exact resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ft
from ft.preemption import PreemptionWatch
from tests import helpers
from tests.helpers import (
    ROOT,
    SCENARIO,
    assert_same_weights,
    engine_env,
    report,
    run_scenario,
    weights,
)

pytestmark = pytest.mark.slow

COMMON = ("--save-freq", "false", "--save-before-preemption")


class _FailingCoordinator:
    """Two processes whose key-value store fails: the agreement cannot complete."""

    process_index, num_processes, is_chief = 1, 2, False

    def publish(self, name: str, value: str) -> None:
        raise RuntimeError("UNAVAILABLE: the coordination service is gone")

    def wait_value(self, name: str, timeout: float) -> str | None:
        return None


def test_one_process_saves_at_the_next_boundary_and_restores_the_handler() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    watch = PreemptionWatch(ft.strategies.SingleProcess(), "preempt", timeout=5)
    watch.install(step=3)
    try:
        assert watch.stop_step(4) is None
        os.kill(os.getpid(), signal.SIGTERM)  # caught: only a flag is set
        assert watch.signalled and watch.stop_step(5) == 5
        assert watch.stop_step(6) == 5
    finally:
        watch.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert ft.PREEMPTED_EXIT_CODE == 42


def test_sigterm_creates_the_launchers_marker_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # python -m ft.launch names the preempted worker from this file.
    marker = tmp_path / "sigterm.1"
    monkeypatch.setenv("FT_SIGTERM_FILE", str(marker))
    watch = PreemptionWatch(ft.strategies.SingleProcess(), "preempt", timeout=5)
    watch.install(step=0)
    try:
        assert not marker.exists()
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.signalled and marker.exists()
    finally:
        watch.uninstall()


def test_a_failed_agreement_is_an_error_not_silence() -> None:
    watch = PreemptionWatch(_FailingCoordinator(), "preempt", timeout=5)
    watch.install(step=10)
    try:
        assert watch.stop_step(11) is None
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(ft.errors.PeerLostError, match="the preemption agreement failed"):
            for step in range(12, 10_000):
                watch.stop_step(step)
                time.sleep(0.01)  # a training step
    finally:
        watch.uninstall()


def test_one_process_sigterm_saves_exits_42_and_resumes_exactly(
    backend: str, tmp_path: Path, references: helpers.References
) -> None:
    ref = references.single(backend)
    backup = tmp_path / "b"
    proc = run_scenario(
        backend,
        tmp_path / "p.npz",
        "--backup-dir",
        str(backup),
        *COMMON,
        "--sigterm-at-step",
        "17",
        expect_rc=ft.PREEMPTED_EXIT_CODE,
    )
    assert "preempted: saved at step 18; exiting with code 42" in proc.stderr
    assert sorted(p.name for p in backup.iterdir() if p.name.startswith("ft-")) == [
        "ft-step-0000000018"
    ]
    out = tmp_path / "resumed.npz"
    run_scenario(backend, out, "--backup-dir", str(backup), *COMMON)
    assert report(out)["restored"]["step"] == 18
    assert_same_weights(weights(ref), weights(out))
    assert not backup.exists()


# The chief learning late and the other worker learning late, one engine each.
@pytest.mark.parametrize(("engine", "signalled", "late"), [("jax", 1, 0), ("tensorflow", 0, 1)])
def test_sigterm_to_one_worker_saves_same_step_on_all_even_if_one_learns_late(
    engine: str, signalled: int, late: int, tmp_path: Path, references: helpers.References
) -> None:
    """Worker `signalled` gets SIGTERM after step 17; worker `late` learns of it 2 s
    later, long after the other could have run past any fixed margin of steps."""
    reference = references(engine)
    result = helpers.job(
        engine,
        tmp_path / "w{index}.npz",
        *("--backup-dir", str(tmp_path / "b"), *COMMON, "--sigterm-at-step", "17"),
        *("--kill-worker", str(signalled), "--late-worker", str(late)),
        grace_period=5,
    )
    assert result.exit_code == 0, result.tail()
    assert (result.restarts, result.preemptions) == (1, 1), result.launcher_lines
    assert "SIGTERM received" in result.workers[signalled].output
    assert "learning of the preemption late" in result.workers[late].lines
    saved = [
        re.findall(r"preempted: saved at step (\d+)", worker.output) for worker in result.workers
    ]
    assert saved[0] == saved[1] and len(saved[0]) == 1, saved
    # The signalled worker holds at boundary 18; the other, blocked in step 19's
    # collective on its device, has passed 18 on its host, and maybe the next
    # boundary too (Keras does not wait for each step's logs when no callback
    # has an on_train_batch_end): its bound, and the agreed step, is past 18.
    step = int(saved[0][0])
    assert step >= 19
    for index, worker in enumerate(result.workers):
        assert worker.resumed is not None and worker.resumed.step == step
        assert report(tmp_path / f"w{index}.npz")["restored"]["step"] == step
        assert_same_weights(reference, weights(tmp_path / f"w{index}.npz"))
    assert re.search(
        r"worker \d was preempted and saved \(exit 42\); restarting the group",
        "\n".join(result.launcher_lines),
    )


def test_launcher_forwards_sigterm_exits_42_and_relaunch_resumes(
    tmp_path: Path, references: helpers.References
) -> None:
    ref = references.single("jax")
    args = [
        sys.executable,
        "-m",
        "ft.launch",
        "-n",
        "1",
        "--grace-period",
        "60",
        str(SCENARIO),
        "--backup-dir",
        str(tmp_path / "b"),
        *COMMON,
        "--out",
        str(tmp_path / "w.npz"),
    ]
    # The first run holds at step 5 until the SIGTERM comes (it could finish first).
    launcher = subprocess.Popen(
        [*args, "--hold-at-step", "5"],
        env=engine_env("jax"),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert launcher.stdout is not None
    for line in launcher.stdout:
        if line.startswith("[worker 0] step 5"):
            launcher.send_signal(signal.SIGTERM)
            break
    rest = launcher.stdout.read()
    assert launcher.wait(timeout=120) == ft.PREEMPTED_EXIT_CODE, rest[-3000:]
    assert "stopped by SIGTERM after the workers saved; exiting 42" in rest
    (saved,) = [p.name for p in (tmp_path / "b").iterdir() if p.name.startswith("ft-step-")]
    step = int(saved.split("-")[-1])
    assert 5 < step < 36
    again = subprocess.run(
        args, env=engine_env("jax"), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert again.returncode == 0, again.stdout[-3000:]
    assert report(tmp_path / "w.npz")["restored"]["step"] == step
    assert_same_weights(weights(ref), weights(tmp_path / "w.npz"))
