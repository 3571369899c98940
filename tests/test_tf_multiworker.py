"""tf.distribute multi-worker through `python -m ft.launch`, with real SIGKILLs.

Two TensorFlow workers train under MultiWorkerMirroredStrategy (ft.strategies.auto())
with ft.BackupAndRestore; a worker is killed, the launcher restarts the group,
and every worker must end with the uninterrupted run's weights.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import SCENARIO, assert_same_weights, report, weights

pytestmark = pytest.mark.slow


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return helpers.launch("tensorflow", *args, timeout=timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("ref")
    proc = launch(
        "-n",
        "2",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--no-backup",
        "--out",
        str(out / "w{index}.npz"),
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    ref0, ref1 = weights(out / "w0.npz"), weights(out / "w1.npz")
    assert_same_weights(ref0, ref1)  # the replicas agree in an uninterrupted run
    return ref0


def _check_resumed(out: Path, reference: dict, proc: subprocess.CompletedProcess[str]) -> None:
    for index in (0, 1):
        rep = report(out / f"w{index}.npz")
        assert rep["restored"] is not None and rep["restored"]["step"] == 15, rep["restored"]
        assert rep["seen"][0] == [1, 3]
        assert_same_weights(reference, weights(out / f"w{index}.npz"))
    assert "restarting the group (1 of 1)" in proc.stdout
    assert "[worker 1] ft [process=1] INFO: restored epoch 1, batch 3 (step 15)" in proc.stdout
    assert "[worker 0] ft [process=0] INFO: restored epoch 1, batch 3 (step 15)" in proc.stdout


def test_worker_killed_mid_epoch_group_resumes_exactly(reference: dict, tmp_path: Path) -> None:
    proc = launch(
        "-n",
        "2",
        "--max-restarts",
        "1",
        "--grace-period",
        "3",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--backup-dir",
        str(tmp_path / "b"),
        "--save-freq",
        "5",
        "--kill-at-step",
        "17",
        "--kill-worker",
        "1",
        "--out",
        str(tmp_path / "w{index}.npz"),
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "worker 1 exited with code 137" in proc.stdout
    _check_resumed(tmp_path, reference, proc)
    assert not (tmp_path / "b").exists(), "deleted once, after every worker finished"


def test_chief_killed_inside_a_save_group_resumes_exactly(reference: dict, tmp_path: Path) -> None:
    # The chief dies in its 4th save (step 20), after Orbax wrote, before the commit.
    proc = launch(
        "-n",
        "2",
        "--max-restarts",
        "1",
        "--grace-period",
        "3",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--backup-dir",
        str(tmp_path / "b"),
        "--save-freq",
        "5",
        "--kill-during-save",
        "4",
        "--kill-worker",
        "0",
        "--out",
        str(tmp_path / "w{index}.npz"),
    )
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert "worker 0 exited with code 137" in proc.stdout
    _check_resumed(tmp_path, reference, proc)


def test_only_the_chief_writes_into_backup_dir(tmp_path: Path) -> None:
    """On worker 1 every CheckpointStore method that writes exits the process."""
    proc = launch(
        "-n",
        "2",
        str(SCENARIO),
        "--strategy",
        "auto",
        "--backup-dir",
        str(tmp_path / "b"),
        "--save-freq",
        "4",
        "--keep",
        "--forbid-writes",
        "--out",
        str(tmp_path / "w{index}.npz"),
    )
    assert "FORBIDDEN WRITE" not in proc.stdout
    assert proc.returncode == 0, proc.stdout[-5000:]
    names = sorted(os.listdir(tmp_path / "b"))
    assert names == [".ft-lock", "ft-step-0000000036"], names
    record = (tmp_path / "b" / "ft-step-0000000036" / "ft-backup.json").read_text()
    assert '"num_processes": 2' in record


def test_survivor_of_a_killed_peer_exits_in_bounded_time(tmp_path: Path) -> None:
    """No restart, a long grace period and a survivor that ignores SIGTERM:
    only ft and TensorFlow's failure detection can end worker 0."""
    proc, _ = helpers.kill_peer_and_time_survivor("tensorflow", tmp_path)
    assert proc.returncode == 137, proc.stdout[-4000:]
    assert "worker 1 exited with code 137; no restart left" in proc.stdout
    # Had the survivor hung, the launcher would have SIGKILLed it after the 120 s
    # grace period and said so: leaving by itself is the guarantee, not a time.
    assert "ignored SIGTERM" not in proc.stdout, "the survivor had to be SIGKILLed: it hung"


def test_keras_still_needs_the_mwms_patches(tmp_path: Path) -> None:
    """Fails when Keras fixes keras#20585 upstream: then drop strategies/keras_mwms_patch.py."""
    script = tmp_path / "unpatched.py"
    script.write_text(
        "import numpy as np, keras, ft\n"
        "from ft.strategies import keras_mwms_patch\n"
        "keras_mwms_patch.apply = lambda: False\n"
        "with ft.strategies.auto().scope():\n"
        "    m = keras.Sequential([keras.layers.Dense(1)])\n"
        "    m.compile('sgd', 'mse')\n"
        "m.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0)\n"
    )
    proc = launch("-n", "2", "--grace-period", "3", str(script), timeout=200)
    assert proc.returncode != 0
    assert "PerReplica" in proc.stdout or "Invalid reduction dimension" in proc.stdout, proc.stdout[
        -3000:
    ]
