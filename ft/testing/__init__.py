"""`ft.testing`: test your own training script against real faults on one machine.

Add fault callbacks to the script's `fit` (`KillWorker`, `PreemptWorker`,
`FreezeWorker`, `RaiseInWorker`), run it as a multi-worker job with
`run(...)` (or the `ft_job` pytest fixture), and assert on the `JobResult`:
exit code, restarts, each worker's output and where it resumed.

`import ft.testing` imports neither Keras nor an engine; the fault callbacks
import Keras when first used (in the workers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ft.testing.result import JobResult, RestorePoint, WorkerResult
from ft.testing.runner import JobRunner, kill_jobs_under, run

if TYPE_CHECKING:
    from ft.testing.faults import (
        FreezeWorker,
        KillWorker,
        PreemptWorker,
        RaiseInWorker,
        WorkerFault,
    )

__all__ = [
    "FreezeWorker",
    "JobResult",
    "JobRunner",
    "KillWorker",
    "PreemptWorker",
    "RaiseInWorker",
    "RestorePoint",
    "WorkerFault",
    "WorkerResult",
    "kill_jobs_under",
    "run",
]

_FAULTS = ("FreezeWorker", "KillWorker", "PreemptWorker", "RaiseInWorker", "WorkerFault")


def __getattr__(name: str) -> Any:
    if name in _FAULTS:
        from ft.testing import faults

        return getattr(faults, name)
    raise AttributeError(f"module 'ft.testing' has no attribute {name!r}")
