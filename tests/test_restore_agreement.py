"""With several processes, every process reads its part of a backup, checking it as it
reads, and they agree before any assigns: all go on, or all fall back, or all stop.

Two threads pose as the processes, over an in-memory key-value store
(`tests.test_strategies`); the multi-process runs are in `tests/test_jax_multihost.py`.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest

from ft import errors, restore
from tests.test_strategies import _Store, _ThreadCoordinator

PATH = "/backups/ft-step-0000000024"


class _Backups:
    """What `restore._agree_on_reads` asks of a store: is an older backup kept, set one aside."""

    def __init__(self, older: bool) -> None:
        self.older = older
        self.aside: list[tuple[str, str]] = []

    def older_than(self, path: str) -> bool:
        return self.older

    def set_aside(self, path: str, reason: Exception) -> str:
        self.aside.append((path, str(reason)))
        return path + ".aside"


def _agree(failures: list[Exception | None], older: bool) -> tuple[list[Any], _Backups]:
    """Each process's outcome of `_agree_on_reads` (True, False, or what it raised)."""
    store, backups = _Store(len(failures)), _Backups(older)
    outcomes: list[Any] = [None] * len(failures)

    def process(index: int) -> None:
        coordinator = _ThreadCoordinator(store, index)
        coordinator.begin(5.0)
        try:
            outcomes[index] = restore._agree_on_reads(
                backups,  # type: ignore[arg-type]
                coordinator,
                5.0,
                PATH,
                failures[index],
            )
        except Exception as e:
            outcomes[index] = e

    threads = [threading.Thread(target=process, args=(i,)) for i in range(len(failures))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes, backups


def _damaged(what: str) -> errors.CheckpointCorruptedError:
    return errors.CheckpointCorruptedError(f"DATA_LOSS: {what}")


def test_when_every_process_read_its_part_all_go_on() -> None:
    outcomes, backups = _agree([None, None, None], older=True)
    assert outcomes == [True, True, True]
    assert backups.aside == []


def test_damage_one_process_read_sets_the_backup_aside_and_all_fall_back() -> None:
    outcomes, backups = _agree([None, _damaged("model.0/c/0/1"), None], older=True)
    assert outcomes == [False, False, False]
    ((path, why),) = backups.aside
    assert path == PATH and "worker 1 found it damaged" in why and "model.0/c/0/1" in why


def test_without_an_older_backup_every_process_raises_the_damage() -> None:
    mine = _damaged("model.0/c/0/1")
    outcomes, backups = _agree([None, mine], older=False)
    assert backups.aside == []
    assert outcomes[1] is mine
    assert isinstance(outcomes[0], errors.CheckpointCorruptedError)
    assert "Worker 1 could not load the backup" in str(outcomes[0])
    assert "model.0/c/0/1" in str(outcomes[0])


def test_a_process_that_failed_otherwise_stops_every_process() -> None:
    mine = RuntimeError("out of host memory")
    # A damaged read elsewhere does not hide it: nothing is set aside, all stop.
    outcomes, backups = _agree([_damaged("optimizer.3"), mine], older=True)
    assert backups.aside == []
    assert outcomes[1] is mine
    assert isinstance(outcomes[0], errors.CheckpointCorruptedError)  # its own error
    outcomes, _ = _agree([None, mine], older=True)
    assert isinstance(outcomes[0], errors.WorkerFailedError)
    assert "Worker 1" in str(outcomes[0]) and "out of host memory" in str(outcomes[0])


@pytest.mark.parametrize("older", [True, False])
def test_one_process_agrees_with_itself(older: bool) -> None:
    assert _agree([None], older)[0] == [True]
