"""JAX multi-host through `python -m ft.launch`: sharded Orbax backups, real SIGKILLs,
restore onto another topology."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ft.testing
from tests import helpers
from tests.helpers import assert_same_weights, report, run_scenario, weights

pytestmark = pytest.mark.slow


def job(out: Path, *args: str, **options: Any) -> ft.testing.JobResult:
    return helpers.job("jax", out, *args, **options)


def assert_close_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("layout", ["data-parallel", "model-parallel"])
def test_process_killed_mid_epoch_group_resumes_exactly(
    layout: str, tmp_path: Path, references: helpers.References
) -> None:
    extra = ("--model-parallel",) if layout == "model-parallel" else ()
    reference = references("jax", *extra)
    backup = tmp_path / "b"
    result = job(
        tmp_path / "r{index}.npz",
        *extra,
        *("--backup-dir", str(backup), "--save-freq", "5"),
        *("--kill-at-step", "17", "--kill-worker", "1"),
        max_restarts=1,
    )
    assert result.exit_code == 0, result.tail()
    assert "worker 1 exited with code 137; restarting the group (1 of 1)" in "\n".join(
        result.launcher_lines
    )
    for index in (0, 1):
        rep = report(tmp_path / f"r{index}.npz")
        assert rep["restored"]["epoch"] == 1 and rep["restored"]["batch"] == 3
        assert rep["seen"][0] == [1, 3]
        resumed = result.workers[index].resumed
        assert resumed is not None and (resumed.epoch, resumed.batch) == (1, 3)
        if layout == "model-parallel":
            assert rep["first_kernel_shard"] == [8, 8], "the kernel is split across the 2 processes"
        assert_same_weights(reference, weights(tmp_path / f"r{index}.npz"))
    assert not backup.exists()


def test_background_saves_of_every_process_move_and_resume_exactly(
    tmp_path: Path, references: helpers.References
) -> None:
    # async_save=True: every process writes its own shards from a device copy on
    # its pipeline's thread while training goes on, the processes meeting through
    # that thread's own barriers. Every write takes 0.5 s longer, a step 0.1 s, and
    # a save comes due every 2 steps: due saves move (the chief decides for both,
    # neither waits). Worker 1 is killed; the group resumes exactly from the step
    # the last commit holds, although training ran on while it was written.
    reference = references("jax", "--model-parallel")
    result = job(
        tmp_path / "w{index}.npz",
        *("--model-parallel", "--backup-dir", str(tmp_path / "b"), "--save-freq", "2"),
        *("--async-save", "--keep", "--slow-writes", "0.5", "--step-seconds", "0.1"),
        *("--kill-at-step", "24", "--kill-worker", "1"),
        max_restarts=1,
    )
    assert result.exit_code == 0, result.tail()
    assert result.restarts == 1, result.launcher_lines
    assert "in the background, every process writing its own shards" in result.output
    reports = [report(tmp_path / f"w{index}.npz") for index in (0, 1)]
    resumed = [result.workers[index].resumed for index in (0, 1)]
    assert resumed[0] is not None and resumed[0] == resumed[1], resumed
    assert reports[0]["restored"] == reports[1]["restored"]
    assert reports[0]["moved"] == reports[1]["moved"] and reports[0]["moved"][0] >= 1, reports
    for index in (0, 1):
        assert reports[index]["first_kernel_shard"] == [8, 8]
        assert_same_weights(reference, weights(tmp_path / f"w{index}.npz"))


def _stored_chunks(backup: Path) -> dict[str, bytes]:
    """Key -> stored bytes of every array chunk of a backup, through TensorStore."""
    import tensorstore as ts

    spec = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{backup}/state/"}}
    kvstore = ts.KvStore.open(spec).result()
    keys = [key for key in kvstore.list().result() if b"/c" in key]
    return {key.decode(): kvstore.read(key).result().value for key in keys}


def test_damage_only_one_process_reads_makes_every_process_fall_back(
    tmp_path: Path, references: helpers.References
) -> None:
    # Each process reads only its own shards, checking every chunk's crc32c as it
    # reads it, and the processes agree before any assigns; the chief no longer
    # reads the other processes' data. A flipped byte in the half of the split
    # kernel that process 1 wrote (4 KiB: OCDBT keeps it in process 1's data
    # file) is found by process 1's read alone: the chief sets the backup aside
    # and both resume, exactly, from the older one.
    options = ("--model-parallel", "--units", "256")
    reference = references("jax", *options)
    backup = tmp_path / "b"
    common = (*options, "--backup-dir", str(backup), "--save-freq", "12", "--double-checkpoint")
    first = job(tmp_path / "k{index}.npz", *common, "--kill-at-step", "30", "--kill-worker", "1")
    assert first.exit_code == 137, first.tail()
    newest = backup / "ft-step-0000000024"
    assert (backup / "ft-step-0000000012").is_dir() and newest.is_dir()
    half = _stored_chunks(newest)["model.0/c/0/1"]  # process 1's half of the first kernel
    files = [p for p in (newest / "state" / "ocdbt.process_1" / "d").iterdir()]
    (data,) = [p for p in files if half in p.read_bytes()]
    raw = bytearray(data.read_bytes())
    raw[raw.find(half) + len(half) // 2] ^= 0x10
    data.write_bytes(bytes(raw))

    result = job(tmp_path / "r{index}.npz", *common)
    assert result.exit_code == 0, result.tail()
    assert "worker 1 found it damaged as it read it" in result.output, result.tail()
    for index in (0, 1):
        rep = report(tmp_path / f"r{index}.npz")
        assert rep["restored"]["step"] == 12, rep["restored"]
        assert_same_weights(reference, weights(tmp_path / f"r{index}.npz"))


def test_every_process_writes_its_own_shards(tmp_path: Path) -> None:
    backup = tmp_path / "b"
    result = job(
        tmp_path / "w{index}.npz",
        *("--model-parallel", "--backup-dir", str(backup), "--save-freq", "12", "--keep"),
    )
    assert result.exit_code == 0, result.tail()
    (committed,) = [p for p in backup.iterdir() if p.name.startswith("ft-step-")]
    state = sorted(p.name for p in (committed / "state").iterdir())
    assert "ocdbt.process_0" in state and "ocdbt.process_1" in state
    assert '"num_processes": 2' in (committed / "ft-backup.json").read_text()


def test_two_process_backup_resumes_in_one_process(
    tmp_path: Path, references: helpers.References
) -> None:
    single = references.single("jax")
    backup = tmp_path / "b"
    result = job(
        tmp_path / "k{index}.npz",
        *("--backup-dir", str(backup), "--save-freq", "5"),
        *("--kill-at-step", "17", "--kill-worker", "1"),
    )
    assert result.exit_code == 137, result.tail()
    out = tmp_path / "one.npz"
    run_scenario("jax", out, "--strategy", "auto", "--backup-dir", str(backup), "--save-freq", "5")
    assert report(out)["restored"]["step"] == 15
    assert_close_weights(weights(single), weights(out))


def test_one_process_backup_resumes_in_two_processes(
    tmp_path: Path, references: helpers.References
) -> None:
    single = references.single("jax")
    backup = tmp_path / "b"
    run_scenario(
        "jax",
        tmp_path / "k.npz",
        "--strategy",
        "auto",
        "--backup-dir",
        str(backup),
        "--save-freq",
        "5",
        "--kill-at-step",
        "17",
        expect_rc=-9,
    )
    result = job(tmp_path / "two{index}.npz", "--backup-dir", str(backup), "--save-freq", "5")
    assert result.exit_code == 0, result.tail()
    for index in (0, 1):
        assert report(tmp_path / f"two{index}.npz")["restored"]["step"] == 15
        assert_close_weights(weights(single), weights(tmp_path / f"two{index}.npz"))


def test_survivor_of_a_killed_peer_exits_in_bounded_time(tmp_path: Path) -> None:
    result, _ = helpers.kill_peer_and_time_survivor("jax", tmp_path)
    assert result.exit_code == 137, result.tail()
    said = "\n".join(result.launcher_lines)
    # Had the survivor hung, the launcher would have SIGKILLed it after the 120 s
    # grace period and said so: leaving by itself is the guarantee, not a time.
    assert "ignored SIGTERM" not in said, "the survivor had to be SIGKILLed: it hung"
    assert os.path.isdir(tmp_path / "b")


def test_survivor_with_a_background_save_in_flight_exits_in_bounded_time(tmp_path: Path) -> None:
    # The save of step 5 is still in flight (its write starts 3 s late, steps take
    # 0.2 s) when worker 1 dies before step 10: worker 0's pipeline thread then
    # waits in a barrier of the write, which the distributed client fails once
    # worker 1's heartbeats stop, and the process leaves by itself.
    result, _ = helpers.kill_peer_and_time_survivor(
        "jax", tmp_path, "--async-save", "--slow-writes", "3", "--step-seconds", "0.2"
    )
    assert result.exit_code == 137, result.tail()
    assert "ignored SIGTERM" not in "\n".join(result.launcher_lines), "the survivor hung"
    assert not list((tmp_path / "b").glob("ft-step-*")), "no save was in flight at the kill"
