"""Every kind of input `fit` takes resumes mid-epoch at the right batch with the same weights.

For each kind and backend, `tests/input_kinds.py` (one process per group of
kinds and backend, since the backend is chosen at import) runs an uninterrupted `fit`, a
`fit` interrupted by an exception after a backup, and a fresh model with a
fresh `ft.BackupAndRestore` that resumes. Where an uninterrupted run cannot be
reproduced (a `tf.data` shuffle without any seed; a `PyDataset` with workers on
JAX), the resume must still train the right batches and log one warning.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import ROOT, engine_env

pytestmark = pytest.mark.slow

RUNNER = ROOT / "tests" / "input_kinds.py"
BATCHES_PER_EPOCH, EPOCHS = 10, 3

# Each group runs in one process per backend (the backend is chosen at import).
GROUPS = {
    "arrays": [
        "numpy",
        "numpy-shuffle",
        "steps-per-execution",
        "numpy-shuffle@epoch-end",
        "generator",
        "generator@epoch-end",
    ],
    "tf-data": [
        "tfdata",
        "tfdata-filter",
        "tfdata-interleave",
        "tfrecord",
        "from-generator",
        "tfdata-repeat",
        "tfdata-reshuffle",
        "tfdata-filter@epoch-end",
        "tfdata-reshuffle@epoch-end",
        "tfdata-repeat@epoch-end",
        "tfdata-reshuffle@save-epoch",
        "tfdata-repeat@save-epoch",
    ],
    "pydataset": [
        "pydataset",
        "pydataset@epoch-end",
        "pydataset@save-epoch",
        "pydataset-workers",
        "pydataset-multiprocessing",
    ],
}
# Exact on TensorFlow; on JAX, Keras's enqueuer carries batches across epochs.
WORKERS = {"pydataset-workers", "pydataset-multiprocessing"}
# TensorFlow refuses unseeded shuffles under op determinism: a process of its own.
UNSEEDED = "tfdata-unseeded"


def _run(backend: str, specs: list[str], out: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "--out", str(out), *specs],
        env=engine_env(backend),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"


def _result(out: Path, spec: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    report = json.loads((out / f"{spec}.json").read_text())
    with np.load(out / f"{spec}.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return report, arrays


def _batch_problems(report: dict[str, Any], spec: str) -> list[str]:
    """What is wrong with where the resume started and what it trained."""
    restored = report["restored"]
    saved = 10 if "@" in spec else (16 if "execution" in spec else 12)
    problems = []
    if (
        restored["step"] != saved
        or restored["epoch"] * BATCHES_PER_EPOCH + restored["batch"] != saved
    ):
        problems.append(f"restored {restored}, expected step {saved}")
    # Callbacks see the true batch index first, and only the batches left are trained.
    if report["first_seen"] != [restored["epoch"], restored["batch"]]:
        problems.append(f"first batch seen {report['first_seen']}")
    if report["batches_after_resume"] != EPOCHS * BATCHES_PER_EPOCH - saved:
        problems.append(
            f"{report['batches_after_resume']} batches after the resume, "
            f"expected {EPOCHS * BATCHES_PER_EPOCH - saved}"
        )
    return problems


def _weights(arrays: dict[str, np.ndarray], run: str) -> list[np.ndarray]:
    names = sorted(
        (k for k in arrays if k.startswith(run + "_")), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    return [arrays[k] for k in names]


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_resume_is_exact(backend: str, group: str, tmp_path: Path) -> None:
    _run(backend, GROUPS[group], tmp_path)
    failures = []
    for spec in GROUPS[group]:
        report, arrays = _result(tmp_path, spec)
        problems = _batch_problems(report, spec)
        if spec in WORKERS and backend == "jax":
            warnings = report["warnings"]
            if not (
                len(warnings) == 1 and "Not exact" in warnings[0] and "workers=1" in warnings[0]
            ):
                problems.append(f"expected one 'Not exact' warning, got {warnings}")
        else:
            if report["warnings"]:
                problems.append(f"warned {report['warnings']}")
            # The optimizer ran as many steps as in the uninterrupted run (with
            # unknown length, Keras's TF trainer counts one more each epoch).
            if report["iterations"] != report["reference_iterations"]:
                problems.append(
                    f"iterations {report['iterations']} != {report['reference_iterations']}"
                )
            reference, resumed = _weights(arrays, "reference"), _weights(arrays, "resumed")
            if not reference or len(reference) != len(resumed):
                problems.append(f"{len(reference)} reference and {len(resumed)} resumed weights")
            for i, (a, b) in enumerate(zip(reference, resumed, strict=False)):
                if not np.array_equal(a, b):
                    problems.append(f"weight {i} differs by up to {np.max(np.abs(a - b))}")
        failures += [f"{spec}: {p}" for p in problems]
    assert not failures, "\n".join(failures)


def test_every_kind_of_the_runner_is_tested() -> None:
    from tests.input_kinds import KINDS

    tested = {spec.partition("@")[0] for specs in GROUPS.values() for spec in specs}
    assert tested | {UNSEEDED} == set(KINDS)


def test_unseeded_tf_data_shuffle_resumes_the_right_batches_and_warns_once(
    backend: str, tmp_path: Path
) -> None:
    _run(backend, [UNSEEDED], tmp_path)
    report, _ = _result(tmp_path, UNSEEDED)
    assert _batch_problems(report, UNSEEDED) == []
    assert len(report["warnings"]) == 1, report["warnings"]
    warning = report["warnings"][0]
    assert "Not exact" in warning and "seed=" in warning and "set_random_seed" in warning
