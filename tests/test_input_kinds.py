"""Every kind of input `fit` takes resumes mid-epoch at the right batch with the same weights.

For each kind and backend, `tests/input_kinds.py` (in a process of its own per
backend, since the backend is chosen at import) runs an uninterrupted `fit`, a
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

EXACT = [
    "numpy",
    "numpy-shuffle",
    "steps-per-execution",
    "tfdata",
    "tfdata-filter",
    "tfdata-interleave",
    "tfrecord",
    "from-generator",
    "tfdata-repeat",
    "tfdata-reshuffle",
    "pydataset",
    "generator",
    "numpy-shuffle@epoch-end",
    "tfdata-filter@epoch-end",
    "tfdata-reshuffle@epoch-end",
    "pydataset@epoch-end",
    "generator@epoch-end",
    "tfdata-repeat@epoch-end",
    "tfdata-reshuffle@save-epoch",
    "tfdata-repeat@save-epoch",
    "pydataset@save-epoch",
]
# Exact on TensorFlow; on JAX, Keras's enqueuer carries batches across epochs.
WORKERS = ["pydataset-workers", "pydataset-multiprocessing"]
UNSEEDED = "tfdata-unseeded"

_runs: dict[tuple[str, tuple[str, ...]], tuple[Path, subprocess.CompletedProcess[str]]] = {}


def _run(backend: str, specs: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run the runner once per backend and spec list in this pytest process."""
    key = (backend, tuple(specs))
    if key not in _runs:
        out = tmp_path_factory.mktemp(f"kinds-{backend}")
        proc = subprocess.run(
            [sys.executable, str(RUNNER), "--out", str(out), *specs],
            env=engine_env(backend),
            capture_output=True,
            text=True,
            timeout=900,
        )
        _runs[key] = (out, proc)
    out, proc = _runs[key]
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    return out


def _result(
    backend: str, spec: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if spec == UNSEEDED:
        # Its own process: TensorFlow refuses unseeded shuffles under op determinism.
        out = _run(backend, [UNSEEDED], tmp_path_factory)
    else:
        out = _run(backend, EXACT + WORKERS, tmp_path_factory)
    report = json.loads((out / f"{spec}.json").read_text())
    with np.load(out / f"{spec}.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    return report, arrays


def _assert_resumed_at_the_right_batch(report: dict[str, Any], spec: str) -> None:
    restored = report["restored"]
    saved = 10 if "@" in spec else (16 if "execution" in spec else 12)
    assert restored["step"] == saved
    assert restored["epoch"] * BATCHES_PER_EPOCH + restored["batch"] == saved
    # Callbacks see the true batch index first, and only the batches left are trained.
    assert report["first_seen"] == [restored["epoch"], restored["batch"]]
    assert report["batches_after_resume"] == EPOCHS * BATCHES_PER_EPOCH - saved


def _weights(arrays: dict[str, np.ndarray], run: str) -> list[np.ndarray]:
    names = sorted(
        (k for k in arrays if k.startswith(run + "_")), key=lambda k: int(k.rsplit("_", 1)[1])
    )
    return [arrays[k] for k in names]


@pytest.mark.parametrize("spec", EXACT + WORKERS)
def test_resume_is_exact(backend: str, spec: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    report, arrays = _result(backend, spec, tmp_path_factory)
    _assert_resumed_at_the_right_batch(report, spec)
    if spec in WORKERS and backend == "jax":
        assert len(report["warnings"]) == 1 and "Not exact" in report["warnings"][0]
        assert "workers=1" in report["warnings"][0]
        return
    assert report["warnings"] == []
    # The optimizer ran as many steps as in the uninterrupted run (with
    # unknown cardinality, Keras's TF trainer counts one more each epoch).
    assert report["iterations"] == report["reference_iterations"]
    reference, resumed = _weights(arrays, "reference"), _weights(arrays, "resumed")
    assert len(reference) == len(resumed) > 0
    for a, b in zip(reference, resumed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_unseeded_tf_data_shuffle_resumes_the_right_batches_and_warns_once(
    backend: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    report, _ = _result(backend, UNSEEDED, tmp_path_factory)
    _assert_resumed_at_the_right_batch(report, UNSEEDED)
    assert len(report["warnings"]) == 1, report["warnings"]
    warning = report["warnings"][0]
    assert "Not exact" in warning and "seed=" in warning and "set_random_seed" in warning
