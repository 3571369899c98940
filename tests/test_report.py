"""What ft says: the begin and end lines of `fit`, `SaveStats`, `[process=N]`, the kept final state."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest

import ft
from ft import inspection, log
from ft.report import SaveStats, what_is_kept


@pytest.fixture
def ft_lines() -> Iterator[list[str]]:
    """ft's log lines as its own handler formats them."""
    lines: list[str] = []
    logger = log.get_logger()
    formatter = logger.handlers[0].formatter

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(formatter.format(record) if formatter else record.getMessage())

    handler = Keep()
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def small_fit(backup_dir: Path, epochs: int = 2, **kwargs: object) -> ft.BackupAndRestore:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x = np.random.default_rng(0).random((50, 4), dtype=np.float32)
    callback = ft.BackupAndRestore(backup_dir, **kwargs)  # type: ignore[arg-type]
    model.fit(x, x[:, :2], batch_size=10, epochs=epochs, verbose=0, callbacks=[callback])
    return callback


def test_save_stats_counts() -> None:
    stats = SaveStats()
    assert (stats.commits, stats.bytes_per_backup, stats.moved_saves) == (0, 0, 0)
    stats.add_commit(100, 0.5)
    stats.add_commit(300, 0.25)
    stats.add_blocked(0.5)
    stats.add_blocked(0.25)
    stats.add_moved(3)
    stats.add_moved(2)
    assert stats.commits == 2 and stats.bytes_per_backup == 200
    assert stats.blocked_seconds == pytest.approx(0.75)
    assert (stats.moved_saves, stats.moved_steps) == (2, 5)


def test_the_end_line_says_what_is_left_in_backup_dir() -> None:
    def kept(final: bool, preempted: bool, dropped: bool) -> str:
        return what_is_kept(final, preempted, dropped, 8, 10, "/b")

    assert kept(False, True, False) == "the backup of step 8 is kept for the restart"
    assert kept(True, False, False) == "kept the final state (step 10) in /b"
    assert kept(False, False, False) == "backups deleted (delete_checkpoint=True)"
    assert kept(False, False, True) == (
        "backups deleted (delete_checkpoint=True); the save due at fit's end was not written"
    )


def test_begin_and_end_lines_say_what_ft_does(tmp_path: Path, ft_lines: list[str]) -> None:
    callback = small_fit(tmp_path / "b", save_freq=3)
    begin, end = ft_lines[0], ft_lines[-1]
    assert re.fullmatch(
        rf"ft \[process=0\] INFO: starting fresh: no backup in {re.escape(str(tmp_path / 'b'))}; "
        r"backing up every 3 batches, synchronously \(state (\d+) B; in the background from "
        r"32\.0 MiB\)",
        begin,
    ), begin
    # 10 batches, saves after batches 3, 6 and 9.
    assert callback.stats.commits == 3
    assert re.fullmatch(
        r"ft \[process=0\] INFO: fit done in [\d.]+ s: 3 backups committed \(\d+ B of state "
        r"each\); training blocked [\d.]+ s by backups \([\d.]+% of fit\); saves moved "
        r"because one was in flight: 0; backups deleted \(delete_checkpoint=True\)",
        end,
    ), end
    assert not any(" DEBUG: " in line for line in ft_lines)  # commits are DEBUG lines


def test_delete_checkpoint_false_keeps_the_final_state(tmp_path: Path, ft_lines: list[str]) -> None:
    small_fit(tmp_path / "b", save_freq=3, delete_checkpoint=False)
    newest = inspection.describe(str(tmp_path / "b"))["backups"][0]
    assert (newest["epoch"], newest["batch"], newest["step"]) == (2, 0, 10)
    assert ft_lines[-1].endswith(f"kept the final state (step 10) in {tmp_path / 'b'}")
    again = small_fit(tmp_path / "b", epochs=3, save_freq=3, delete_checkpoint=False)
    assert again.restored is not None and again.restored["step"] == 10
    assert any(
        line.startswith("ft [process=0] INFO: restored epoch 2, batch 0 (step 10) from ")
        for line in ft_lines
    )


def test_process_index_comes_from_the_launcher_else_the_engine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FT_PROCESS_INDEX", raising=False)
    monkeypatch.setattr(log, "_engine_index", None)
    assert log.process_index() == "0"
    log.set_process_index(3)
    assert log.process_index() == "3"
    monkeypatch.setenv("FT_PROCESS_INDEX", "1")
    assert log.process_index() == "1"
