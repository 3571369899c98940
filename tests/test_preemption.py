"""save_before_preemption: a real SIGTERM, a save at one agreed step, exit 42, exact resume."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import ft
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


def test_exit_code_is_public() -> None:
    assert ft.PREEMPTED_EXIT_CODE == 42


def test_one_process_sigterm_saves_exits_42_and_resumes_exactly(
    backend: str, tmp_path: Path
) -> None:
    ref = tmp_path / "ref.npz"
    run_scenario(backend, ref, "--no-backup")
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


def _launch(backend: str, *args: str) -> subprocess.CompletedProcess[str]:
    return helpers.launch(backend, *args)


@pytest.mark.parametrize("engine", ["tensorflow", "jax"])
def test_sigterm_to_one_worker_saves_same_step_on_all_and_relaunch_resumes(
    engine: str, tmp_path: Path
) -> None:
    ref = _launch(
        engine,
        "-n",
        "2",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--no-backup",
        "--out",
        str(tmp_path / "ref{index}.npz"),
    )
    assert ref.returncode == 0, ref.stdout[-3000:]
    proc = _launch(
        engine,
        "-n",
        "2",
        "--grace-period",
        "5",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--backup-dir",
        str(tmp_path / "b"),
        *COMMON,
        "--sigterm-at-step",
        "17",
        "--kill-worker",
        "1",
        "--out",
        str(tmp_path / "w{index}.npz"),
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    # Worker 1 got SIGTERM after step 17 and proposed step 18 + 4; both saved there.
    assert (
        "[worker 1] ft [process=1] INFO: SIGTERM received: proposing to save and stop at step 22"
        in proc.stdout
    )
    for index in (0, 1):
        assert (
            f"[worker {index}] ft [process={index}] INFO: preempted: saved at step 22"
            in proc.stdout
        )
        assert report(tmp_path / f"w{index}.npz")["restored"]["step"] == 22
        assert_same_weights(weights(tmp_path / "ref0.npz"), weights(tmp_path / f"w{index}.npz"))
    assert re.search(
        r"worker 1 was preempted and saved \(exit 42\); restarting the group", proc.stdout
    )


def test_launcher_forwards_sigterm_exits_42_and_relaunch_resumes(tmp_path: Path) -> None:
    ref = tmp_path / "ref.npz"
    run_scenario("jax", ref, "--no-backup")
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
    launcher = subprocess.Popen(
        args, env=engine_env("jax"), stdout=subprocess.PIPE, text=True, cwd=ROOT
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
