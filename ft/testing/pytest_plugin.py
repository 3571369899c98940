"""ft's pytest plugin: the `ft_job` fixture, which runs multi-worker jobs and cleans up after them.

Registered through the `pytest11` entry point under the name
`ft.testing.pytest_plugin`, so `-p ft.testing.pytest_plugin` (or
`pytest_plugins = ["ft.testing.pytest_plugin"]`) loads it where entry points
are not loaded, and `-p no:ft.testing.pytest_plugin` turns it off. It adds
no hooks and imports neither Keras nor an engine: it does nothing unless a
test asks for `ft_job`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ft.testing.runner import JobRunner


@pytest.fixture
def ft_job(tmp_path: Path) -> Iterator[JobRunner]:
    """An `ft.testing.JobRunner` on the test's `tmp_path`: `ft_job(script, num_workers=2,
    backend="jax", ...)` runs a job as `ft.testing.run` does and returns its `JobResult`;
    every process the test's jobs left is stopped when the test ends."""
    runner = JobRunner(tmp_path)
    yield runner
    runner.close()
