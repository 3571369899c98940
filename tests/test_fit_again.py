"""`fit` called again in the same processes after it raised or finished (issue 11, point 3)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ft.testing
from tests import helpers

pytestmark = pytest.mark.slow

SCRIPT = helpers.ROOT / "tests" / "fit_again.py"


def _run(backend: str, workers: int, out: Path, *args: str) -> list[dict]:
    out.mkdir()
    result = ft.testing.run(
        SCRIPT,
        num_workers=workers,
        args=["--dir", str(out / "b"), "--out", str(out / "r{index}.json"), *args],
        backend=backend,
        grace_period=3,
        directory=out / "job",
    )
    assert result.exit_code == 0, result.tail()
    return [json.loads((out / f"r{i}.json").read_text()) for i in range(workers)]


@pytest.mark.parametrize("workers", [1, 2])
def test_fit_again_after_an_error_and_after_a_finished_fit(
    backend: str, workers: int, tmp_path: Path
) -> None:
    (ref, *_) = _run(backend, workers, tmp_path / "ref", "--reference")
    reports = _run(backend, workers, tmp_path / "run")
    for rep in reports:
        # Each retry restored what the fit that raised had saved, on every process.
        assert [r["step"] for r in rep["restored"]] == [10, 5]
        assert [(r["epoch"], r["batch"]) for r in rep["restored"]] == [(0, 10), (0, 5)]
        # Interrupted and retried in-process == uninterrupted, after each phase.
        assert (rep["phase_a"], rep["phase_b"]) == (ref["phase_a"], ref["phase_b"])
        # What ft installed for a fit did not outlive the fit that raised.
        assert rep["handler_after_raise"] == [True, True]
        assert rep["guard_after_raise"] == [False, False]
