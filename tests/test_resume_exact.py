"""Interrupted-and-resumed runs end with the uninterrupted run's weights, on both backends.

Each run is a process of its own (tests/scenario.py), killed for real.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import (
    SCENARIO,
    References,
    assert_same_weights,
    engine_env,
    report,
    run_scenario,
    weights,
)

pytestmark = pytest.mark.slow


# Unshuffled numpy is what fit's shuffle leaves out; every input kind resumes exactly
# after an exception in tests/test_input_kinds.py.
@pytest.mark.parametrize("data", ["numpy-shuffle", "tfdata"])
def test_sigkill_mid_epoch_resumes_at_same_batch_with_same_weights(
    backend: str, data: str, tmp_path: Path, references: References
) -> None:
    ref = references.single(backend, "--input", data)
    backup = str(tmp_path / "backup")
    common = ("--input", data, "--backup-dir", backup, "--save-freq", "5")
    killed = run_scenario(
        backend, tmp_path / "killed.npz", *common, "--kill-at-step", "17", expect_rc=-signal.SIGKILL
    )
    assert "step 17" in killed.stdout
    out = tmp_path / "resumed.npz"
    resumed = run_scenario(backend, out, *common, "--steps-before", "15")
    rep = report(out)
    # 12 batches an epoch: step 15 is epoch 1, batch 3.
    assert rep["restored"]["epoch"] == 1 and rep["restored"]["batch"] == 3
    assert rep["seen"][0] == [1, 3], "callbacks must see the true batch index"
    assert len(rep["seen"]) == 36 - 15, "only the batches that were left run"
    assert "restored epoch 1, batch 3 (step 15)" in resumed.stderr
    assert_same_weights(weights(ref), weights(out))
    # The metric accumulators were restored too: the resumed epoch's logs match.
    ref_history = report(ref)["history"]
    assert rep["history"]["loss"] == ref_history["loss"][1:]
    assert rep["history"]["mae"] == ref_history["mae"][1:]
    assert not rep["backup_dir_exists"], "the backup is deleted when fit completes"


def test_steps_per_epoch_iterator_kept_across_epochs(
    backend: str, tmp_path: Path, references: References
) -> None:
    ref = references.single(backend, "--input", "steps")
    backup = str(tmp_path / "backup")
    common = ("--input", "steps", "--backup-dir", backup, "--save-freq", "4")
    run_scenario(backend, tmp_path / "k.npz", *common, "--kill-at-step", "10", expect_rc=-9)
    out = tmp_path / "resumed.npz"
    run_scenario(backend, out, *common, "--steps-before", "8")
    assert report(out)["restored"]["epoch"] == 1 and report(out)["restored"]["batch"] == 3
    assert_same_weights(weights(ref), weights(out))


def test_sigkill_inside_a_save_keeps_the_previous_backup(
    backend: str, tmp_path: Path, references: References
) -> None:
    ref = references.single(backend)
    backup = tmp_path / "backup"
    common = ("--backup-dir", str(backup), "--save-freq", "4")
    # Dies in the 3rd save (step 12), after Orbax wrote the arrays, before the commit.
    run_scenario(backend, tmp_path / "k.npz", *common, "--kill-during-save", "3", expect_rc=-9)
    names = sorted(os.listdir(backup))
    assert "ft-step-0000000008" in names
    assert any(n.startswith(".ft-tmp-12-") for n in names), names
    out = tmp_path / "resumed.npz"
    run_scenario(backend, out, *common, "--steps-before", "8")
    assert report(out)["restored"]["step"] == 8
    assert_same_weights(weights(ref), weights(out))


def test_random_sigkills_while_saving_every_batch(
    backend: str, tmp_path: Path, references: References
) -> None:
    """SIGKILL at random moments (mid-save included) with saves committed in the
    background; the last run ends exact."""
    seed = int(os.environ.get("FT_TORTURE_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    ref = references.single(backend)
    backup = str(tmp_path / "backup")
    total, done, kills = 36, 0, 0
    while kills < 4 and done < total - 4:
        # Until a first backup is committed (saves run in the background and a due
        # save moves past one in flight), kill anywhere in the run; then close to it.
        reach = done + 10 if done else total - 2
        target = rng.randint(done + 1, min(reach, total - 2))
        proc = subprocess.Popen(
            [
                sys.executable,
                str(SCENARIO),
                "--out",
                str(tmp_path / "k.npz"),
                "--backup-dir",
                backup,
                "--save-freq",
                "1",
                "--async-save",
                # The kill can land after fit's last steps, once fit's end has run:
                # kept, its backups stay (deleted, nothing would be left to resume).
                "--keep",
            ],
            env=engine_env(backend),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            # "step N" counts this run's batches, printed once the batch's save was handed
            # to the background writer (it commits a little later).
            if line.startswith("step "):
                if int(line.split()[1]) >= target - done:
                    time.sleep(rng.uniform(0, 0.05))  # lands inside a save some of the time
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: run ended on its own"
        kills += 1
        committed = [n for n in os.listdir(backup) if n.startswith("ft-step-")]
        # Saves commit in the background, so a kill can land before the first
        # commit; once a backup is committed, a kill must never lose it.
        assert committed or done == 0, f"seed {seed}: the committed backup was lost"
        if not committed:
            continue
        done = max(int(n.split("-")[-1]) for n in committed)
    out = tmp_path / "final.npz"
    run_scenario(backend, out, "--backup-dir", backup, "--save-freq", "1", "--async-save")
    restored = report(out)["restored"]
    if done == 0:
        assert restored is None, f"seed {seed}: restored {restored} with no backup committed"
    else:
        assert restored is not None and restored["step"] == done, f"seed {seed}: {restored}"
    assert_same_weights(weights(ref), weights(out))
