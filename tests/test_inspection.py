"""`python -m ft inspect`: readable and JSON reports, checksum verification, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import ft
from tests.helpers import ROOT


def inspect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ft", "inspect", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("adam", "mse")
    x = np.ones((12, 3), "float32")
    callback = ft.BackupAndRestore(tmp_path / "b", save_freq=2, delete_checkpoint=False)
    model.fit(x, x[:, :2], batch_size=4, epochs=2, callbacks=[callback], verbose=0)
    return tmp_path / "b"


def test_reports_where_training_resumes_and_that_files_are_intact(backup_dir: Path) -> None:
    proc = inspect(str(backup_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ft-step-0000000006 (newest)" in proc.stdout
    assert "resumes at: epoch 2, batch 0 (global step 6)" in proc.stdout
    assert "1 process(es), jax backend" in proc.stdout
    assert "intact (every file and every array checksum verified)" in proc.stdout
    assert "live run:   none" in proc.stdout


def test_json_output_for_scripts(backup_dir: Path) -> None:
    proc = inspect(str(backup_dir), "--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 0 and report["ok"] is True
    (backup,) = report["backups"]
    assert (backup["epoch"], backup["batch"], backup["step"]) == (2, 0, 6)
    assert backup["num_processes"] == 1 and backup["size_bytes"] > 0 and backup["intact"]


def test_truncated_file_is_caught_with_nonzero_exit(backup_dir: Path) -> None:
    (backup,) = [p for p in backup_dir.iterdir() if p.name.startswith("ft-step-")]
    victim = max(
        (p for p in (backup / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    victim.write_bytes(victim.read_bytes()[:-7])
    proc = inspect(str(backup_dir))
    assert proc.returncode == 1
    assert "DAMAGED" in proc.stdout and str(victim) in proc.stdout
    report = json.loads(inspect(str(backup_dir), "--json").stdout)
    assert report["ok"] is False and report["backups"][0]["intact"] is False


def test_no_backup_and_leftovers(tmp_path: Path) -> None:
    (tmp_path / "b" / ".ft-tmp-3-abc").mkdir(parents=True)
    proc = inspect(str(tmp_path / "b"))
    assert proc.returncode == 3
    assert (
        "no committed backup" in proc.stdout
        and ".ft-tmp-3-abc: left by an interrupted save" in proc.stdout
    )
    assert inspect(str(tmp_path / "missing")).returncode == 3


def test_backup_moved_aside_as_damaged_is_listed(backup_dir: Path) -> None:
    (backup,) = [p for p in backup_dir.iterdir() if p.name.startswith("ft-step-")]
    victim = max(
        (p for p in (backup / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x04
    victim.write_bytes(bytes(data))
    backup.rename(backup_dir / ".ft-damaged-6-0123abcd")
    proc = inspect(str(backup_dir))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert ".ft-damaged-6-0123abcd (moved aside: found damaged by a run" in proc.stdout
    assert "was:        epoch 2, batch 0 (global step 6)" in proc.stdout
    assert "DAMAGED" in proc.stdout
    report = json.loads(inspect(str(backup_dir), "--json").stdout)
    (aside,) = report["moved_aside"]
    assert aside["step"] == 6 and aside["intact"] is False and report["backups"] == []


def test_live_run_is_reported(backup_dir: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from ft.store import posix_lock; posix_lock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(60)",
            str(backup_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert "live run:   pid" in inspect(str(backup_dir)).stdout
    finally:
        holder.kill()
        holder.wait()
    assert "live run:   none" in inspect(str(backup_dir)).stdout


def test_unknown_command_prints_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ft", "frobnicate"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
    assert "\n  inspect " in proc.stderr and "\n  launch " in proc.stderr
