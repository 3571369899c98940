"""The end of a completed `fit`: the last save, the wait for it, the backups' fate, the end line.

Call `complete` on all processes, on the training thread, from the
callback's `on_train_end` (Keras calls it only when `fit` completes; a
preempted `fit` completes too, cut short at the agreed step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import ft.strategies as strategies
from ft import report, save_pipeline
from ft.log import get_logger
from ft.schedule import SaveSchedule
from ft.snapshot import Snapshotter
from ft.store import BackupStore

logger = get_logger()


def complete(
    *,
    schedule: SaveSchedule,
    save: Callable[[int, int, bool], None],
    num_batches: int | None,
    store: BackupStore,
    coordinator: strategies.Coordinator,
    pipeline: save_pipeline.SavePipeline,
    snapshotter: Snapshotter,
    stats: report.SaveStats,
    delete_checkpoint: bool,
    preempted: bool,
    timeout: float,
    fit_start: float,
) -> None:
    """Settle the save still due, wait for the last backup, delete or keep, log the end line.

    `save(epoch, batch, at_epoch_end)` is the callback's own save (every
    process, at this step). A save moved past the last step is made when the
    backups are kept (`delete_checkpoint=False`: the final state is kept), and
    dropped, counted as moved, when they are about to be deleted: it would be
    written only to be removed, and a crash before the deletion resumes from
    the last committed backup. After a preemption the preemption save is the
    one kept, and nothing else is saved. `fit_start`: `time.monotonic()` when
    this `fit` began.
    """
    delete = delete_checkpoint and not preempted
    keep = not delete_checkpoint and not preempted
    moved = schedule.drop_due() if delete else None
    if moved is not None:  # it moved, to past the end
        stats.add_moved(moved)
    if keep and schedule.unsaved:
        save(*schedule.position(num_batches, fit_ended=True))  # the end of fit waits for it
    schedule.drop_due()
    _finish(store, coordinator, pipeline, snapshotter, stats, delete=delete, timeout=timeout)
    kept = report.what_is_kept(
        keep, preempted, moved is not None, schedule.last_saved_step, schedule.step, store.directory
    )
    writer = coordinator.is_chief or strategies.every_process_writes(coordinator)
    logger.info(report.end_message(stats, time.monotonic() - fit_start, writer, kept))


def _finish(
    store: BackupStore,
    coordinator: strategies.Coordinator,
    pipeline: save_pipeline.SavePipeline,
    snapshotter: Snapshotter,
    stats: report.SaveStats,
    *,
    delete: bool,
    timeout: float,
) -> None:
    """Wait for the last backup, then delete the backups when `delete`. All processes.

    Waits for the last backup to commit (the training thread is blocked, and
    counted so), frees the snapshot's buffers, then, once every worker is done
    with the backups, the chief deletes them when `delete` and unlocks `backup_dir`.
    """
    start = time.perf_counter()
    pipeline.wait(timeout)  # fit returns only once the last backup is committed
    stats.add_blocked(time.perf_counter() - start)
    snapshotter.release()
    coordinator.barrier("train-end", timeout)
    if coordinator.is_chief:
        if delete:
            store.delete()
        store.unlock()
