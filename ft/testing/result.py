"""What `ft.testing.run` returns: exit code, restarts, each worker's output and resume points.

Built in the test process from the launcher's output: `[worker i] ` lines
are worker i's, `[ft.launch] ` lines are the launcher's own.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

_WORKER_LINE = re.compile(r"^\[worker (\d+)\] ?(.*)$")
_LAUNCHER_PREFIX = "[ft.launch] "
# ft's own INFO line (ft/backup_and_restore.py), wherever a log prefix puts it.
_RESTORED = re.compile(
    r"restored epoch (\d+), batch (\d+) \(step (\d+)\) from (\S.*?)(?:; backing up .*)?\s*$"
)
_RESTART = re.compile(r"restarting the group")
_PREEMPTED = re.compile(r"preempted")


@dataclass(frozen=True)
class RestorePoint:
    """Where a worker resumed: the epoch, batch in it and global step of the backup it loaded."""

    epoch: int
    batch: int
    step: int
    path: str


@dataclass
class WorkerResult:
    """One worker's output over every launch of the group.

    Attributes:
        index: The worker's index (`FT_PROCESS_INDEX`).
        lines: Its output lines (stdout and stderr), without the launcher's
            `[worker i]` prefix, in order, over all launches.
        times: When each of `lines` reached the test: seconds since the job started.
        restores: Every backup it restored, one per launch that found one, in order.
    """

    index: int
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    restores: list[RestorePoint] = field(default_factory=list)

    @property
    def resumed(self) -> RestorePoint | None:
        """The last backup this worker restored, or None if it never restored one."""
        return self.restores[-1] if self.restores else None

    @property
    def output(self) -> str:
        """`lines` joined with newlines."""
        return "\n".join(self.lines)


@dataclass
class JobResult:
    """How a job run by `ft.testing.run` ended.

    Attributes:
        exit_code: The launcher's exit code: 0 when every worker of the last
            launch exited 0, else the failing worker's (128 + N for signal N).
        restarts: How many times the launcher started the group again, for
            any reason (`FT_RESTART_COUNT` of the last launch).
        preemptions: How many of those restarts followed a preemption (a
            worker exited 42 after saving); they use no `max_restarts`.
        workers: One `WorkerResult` per worker, by index.
        launcher_lines: The launcher's own lines (`[ft.launch] ...`) and anything
            else it printed.
        lines: Every output line, as the launcher printed it.
        directory: The job's directory (`FT_TESTING_DIR`): fault markers and
            whatever the script writes there.
    """

    exit_code: int
    restarts: int
    preemptions: int
    workers: list[WorkerResult]
    launcher_lines: list[str]
    lines: list[str]
    directory: str

    @property
    def resumed(self) -> list[RestorePoint | None]:
        """Each worker's last restore point, by index."""
        return [worker.resumed for worker in self.workers]

    @property
    def output(self) -> str:
        """Every output line joined with newlines."""
        return "\n".join(self.lines)

    def tail(self, count: int = 60) -> str:
        """The last `count` output lines, for assertion messages."""
        return "\n".join(self.lines[-count:])


def parse(
    lines: Sequence[str],
    num_workers: int,
    exit_code: int,
    directory: str,
    times: Sequence[float] | None = None,
) -> JobResult:
    """A `JobResult` from the launcher's output lines (and when each arrived)."""
    all_lines = list(lines)
    arrived = (list(times or ()) + [0.0] * len(all_lines))[: len(all_lines)]
    workers = [WorkerResult(index) for index in range(num_workers)]
    launcher: list[str] = []
    restarts = preemptions = 0
    for line, when in zip(all_lines, arrived, strict=True):
        match = _WORKER_LINE.match(line)
        if match and int(match.group(1)) < num_workers:
            worker = workers[int(match.group(1))]
            text = match.group(2)
            worker.lines.append(text)
            worker.times.append(when)
            restored = _RESTORED.search(text)
            if restored:
                epoch, batch, step = (int(restored.group(i)) for i in (1, 2, 3))
                worker.restores.append(RestorePoint(epoch, batch, step, restored.group(4)))
            continue
        launcher.append(line)
        if line.startswith(_LAUNCHER_PREFIX) and _RESTART.search(line):
            restarts += 1
            preemptions += bool(_PREEMPTED.search(line))
    return JobResult(
        exit_code=exit_code,
        restarts=restarts,
        preemptions=preemptions,
        workers=workers,
        launcher_lines=launcher,
        lines=all_lines,
        directory=directory,
    )
