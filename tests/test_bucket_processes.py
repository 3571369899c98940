"""Backups in a bucket across real processes: SIGKILLs, restarts, 2 workers, the lease.

Each run is a process of its own (tests/scenario.py or `python -m ft.launch`)
reaching a real local server (tests/object_stores.py) through the usual
variables, which the `bucket` fixture sets in the environment they inherit.
A restart of the same job carries the same `FT_LAUNCH_ID`, as under
`python -m ft.launch`, so it takes over the lease its killed predecessor held.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import (
    assert_same_weights,
    engine_env,
    report,
    run_scenario,
    weights,
)
from tests.test_bucket_store import objects

pytestmark = pytest.mark.slow


@pytest.fixture
def same_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FT_LAUNCH_ID", uuid.uuid4().hex)


# One engine per scheme keeps the suite short; each engine and each scheme is covered.
@pytest.mark.parametrize(
    ("backend", "bucket"), [("tensorflow", "s3"), ("jax", "gs")], indirect=["bucket"]
)
def test_sigkill_mid_epoch_resumes_exactly_from_the_bucket(
    backend: str, bucket, same_job: None, tmp_path: Path, references: helpers.References
) -> None:
    ref = weights(references.single(backend))
    common = ("--backup-dir", bucket.url, "--save-freq", "5")
    killed = run_scenario(
        backend, tmp_path / "k.npz", *common, "--kill-at-step", "17", expect_rc=-signal.SIGKILL
    )
    assert "step 17" in killed.stdout
    assert "ft-step-0000000015/ft-commit.json" in objects(bucket.url)
    out = tmp_path / "resumed.npz"
    resumed = run_scenario(backend, out, *common, "--steps-before", "15")
    rep = report(out)
    assert (rep["restored"]["epoch"], rep["restored"]["batch"]) == (1, 3)
    assert rep["restored"]["path"] == f"{bucket.url}/ft-step-0000000015"
    assert len(rep["seen"]) == 36 - 15
    assert "restored epoch 1, batch 3 (step 15)" in resumed.stderr
    assert_same_weights(ref, weights(out))
    assert not rep["backup_dir_exists"], "every object ft wrote is deleted at the end"


# One engine per scheme keeps the suite short; each engine and each scheme is covered.
@pytest.mark.parametrize(
    ("backend", "bucket"), [("jax", "s3"), ("tensorflow", "gs")], indirect=["bucket"]
)
def test_sigkill_inside_a_save_keeps_the_previous_backup(
    backend: str, bucket, same_job: None, tmp_path: Path, references: helpers.References
) -> None:
    ref = weights(references.single(backend))
    common = ("--backup-dir", bucket.url, "--save-freq", "4")
    # Dies in the 3rd save (step 12), after every array was written, before the marker.
    run_scenario(backend, tmp_path / "k.npz", *common, "--kill-during-save", "3", expect_rc=-9)
    keys = objects(bucket.url)
    assert "ft-step-0000000008/ft-commit.json" in keys
    assert any(k.startswith("ft-step-0000000012/arrays/") for k in keys), sorted(keys)
    assert "ft-step-0000000012/ft-commit.json" not in keys
    inspected = subprocess.run(
        [sys.executable, "-m", "ft", "inspect", bucket.url],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=helpers.ROOT,
    )
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert "ft-step-0000000008 (newest)" in inspected.stdout
    assert "resumes at: epoch 0, batch 8 (global step 8)" in inspected.stdout
    assert "ft-step-0000000012: left by an interrupted save" in inspected.stdout
    out = tmp_path / "resumed.npz"
    run_scenario(backend, out, *common, "--steps-before", "8")
    assert report(out)["restored"]["step"] == 8
    assert_same_weights(ref, weights(out))


@pytest.mark.parametrize(
    ("backend", "bucket"),
    [("tensorflow", "gs"), ("jax", "s3")],  # each engine and each scheme, crossed as above
    indirect=["bucket"],
)
def test_two_workers_killed_and_restarted_resume_exactly_from_the_bucket(
    backend: str, bucket, references: helpers.References, tmp_path: Path
) -> None:
    """A worker SIGKILLed mid-epoch under `python -m ft.launch`; the group restarts.

    Worker 1 exits on any store method that only the chief may call. TensorFlow:
    the chief alone writes. JAX: the first kernel is split over the 2
    processes, and each writes the chunks of its own shards of it.
    """
    layout = ("--model-parallel",) if backend == "jax" else ()
    reference = references(backend, *layout)
    result = helpers.job(
        backend,
        tmp_path / "r{index}.npz",
        *layout,
        "--forbid-writes",
        *("--backup-dir", bucket.url, "--save-freq", "5"),
        *("--kill-at-step", "17", "--kill-worker", "1"),
        max_restarts=1,
    )
    assert result.exit_code == 0, result.tail()
    assert "FORBIDDEN WRITE" not in result.output
    assert "worker 1 exited with code 137" in "\n".join(result.launcher_lines)
    for index in (0, 1):
        rep = report(tmp_path / f"r{index}.npz")
        assert rep["restored"]["step"] == 15, rep["restored"]
        assert rep["restored"]["path"] == f"{bucket.url}/ft-step-0000000015"
        assert rep["seen"][0] == [1, 3]
        if backend == "jax":
            assert rep["first_kernel_shard"] == [8, 8], "the kernel is split across the 2 processes"
        assert_same_weights(reference, weights(tmp_path / f"r{index}.npz"))
    assert objects(bucket.url) == {}, "deleted once, after every worker finished"


HOLD_LEASE = """
import sys
from ft.store.bucket_lease import Lease
from ft.store.bucket_paths import BucketURL, filesystem
location = BucketURL.parse(sys.argv[1])
lease = Lease(filesystem(location.scheme), location, ttl=3.0)
lease.acquire(timeout=30)
print("held", flush=True)
sys.stdin.read()
lease.release()
"""


def test_second_live_run_is_refused_by_the_lease(bucket, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LEASE, bucket.url],
        env=engine_env("jax"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=helpers.ROOT,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        proc = run_scenario("jax", tmp_path / "second.npz", "--backup-dir", bucket.url, expect_rc=1)
        assert "BackupDirInUseError" in proc.stderr
        assert f"backup_dir {bucket.url} is in use by another live training run" in proc.stderr
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert objects(bucket.url) == {}, "the holder released its lease; the refused run wrote nothing"
