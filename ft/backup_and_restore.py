"""`ft.BackupAndRestore`: Keras's callback, made exact, atomic and multi-process aware."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import keras

import ft.strategies as strategies
from ft import (
    arguments,
    fit_end,
    fit_exit,
    fit_loop,
    log,
    preemption,
    report,
    restore,
    save_pipeline,
    saving,
    training_state,
)
from ft.input_state import InputState
from ft.log import get_logger
from ft.metadata import BackupRecord
from ft.saving import ASYNC_THRESHOLD_BYTES
from ft.schedule import SaveSchedule
from ft.snapshot import Snapshotter
from ft.store import BackupStore, open_store

logger = get_logger()


class BackupAndRestore(keras.callbacks.Callback):
    """Callback to back up and restore the whole training state.

    A drop-in replacement for `keras.callbacks.BackupAndRestore`. It backs up
    the training state in `backup_dir` at the end of each epoch, or every
    `save_freq` batches, and when training restarts after an interruption, the
    next `Model.fit` restores the newest backup and continues from the same
    epoch **and batch**: only the batches that were left are run, and callbacks
    and the progress bar see their true batch index. The newest `max_to_keep`
    backups are kept (one by default, two with `double_checkpoint=True`); they
    are deleted when `fit` completes unless `delete_checkpoint=False`. A backup
    found damaged at restore is moved aside and never loaded, and training
    resumes from the newest intact one kept.

    The training state is every model variable (trainable or not: BatchNorm
    statistics, seed generator states), every optimizer variable including
    `iterations`, the metric accumulators, the epoch, the batch within the
    epoch, the global step, and what orders the remaining batches: the host
    random state (NumPy's, Python's `random`, Keras's global seed generator)
    when the input iterator started, and how often the input was started over
    (see docs/resumption.md for each kind of input). Arrays are
    stored with Orbax; a backup is committed atomically, after every file is
    fsynced, and the previous one is removed only afterwards, so a crash at any
    moment leaves a complete backup.

    Note that the user is responsible for bringing jobs back after the
    interruption, and that the model restored from a backup is expected to be
    the same as the one that wrote it: a backup of a different model or
    optimizer is refused with `ft.errors.IncompatibleCheckpointError`.

    Example:

    >>> class InterruptingCallback(keras.callbacks.Callback):
    ...   def on_epoch_begin(self, epoch, logs=None):
    ...     if epoch == 4:
    ...       raise RuntimeError('Interrupting!')
    >>> callback = ft.BackupAndRestore(backup_dir="/tmp/backup")
    >>> model = keras.models.Sequential([keras.layers.Dense(10)])
    >>> model.compile(keras.optimizers.SGD(), loss='mse')
    >>> try:
    ...   model.fit(np.arange(100).reshape(5, 20), np.zeros(5), epochs=10,
    ...             batch_size=1, callbacks=[callback, InterruptingCallback()],
    ...             verbose=0)
    ... except:
    ...   pass
    >>> history = model.fit(np.arange(100).reshape(5, 20), np.zeros(5),
    ...                     epochs=10, batch_size=1, callbacks=[callback],
    ...                     verbose=0)
    >>> # Only 6 more epochs are run, since first training got interrupted at
    >>> # zero-indexed epoch 4, second training will continue from 4 to 9.
    >>> len(history.history['loss'])
    6

    Args:
        backup_dir: String or path-like, the directory where the backups are
            stored. It must not be shared with another training run; files of
            your own there are left alone.
        save_freq: `"epoch"`, a positive integer, or `False`. `"epoch"` saves at
            the end of each epoch; an integer saves every `save_freq` batches
            (counted across epochs). `False` saves only before preemption and
            requires `save_before_preemption=True`. Defaults to `"epoch"`.
        double_checkpoint: Boolean. If `True`, the previous backup is kept
            beside the newest one, and training falls back to it when the
            newest is found damaged (Keras's meaning). It keeps at least two
            backups: `max(max_to_keep, 2)`. Defaults to `False`.
        delete_checkpoint: Boolean. If `True`, every backup ft wrote
            (damaged ones moved aside included) is deleted when `fit`
            completes. Use `False` to keep them: then the newest holds the
            state `fit` ended with (a last backup is saved at the end of
            `fit` when the last periodic one is older). Defaults to `True`.
        save_before_preemption: Boolean. If `True`, a SIGTERM to any worker
            makes every worker save a backup of the same step at a batch
            boundary soon after, leave `fit`, and exit the process with code
            `ft.PREEMPTED_EXIT_CODE` (42), which means "preempted, restart me"
            to `python -m ft.launch`. The backup is kept. Defaults to `False`.
        max_to_keep: Keyword-only positive integer, how many committed
            backups to keep, newest first; older ones are deleted after each
            commit. A backup found damaged is moved aside to
            `.ft-damaged-<step>-<id>/` (named in a WARNING, listed by
            `python -m ft inspect`) and does not count. Defaults to 1, as
            in Keras (2 when `double_checkpoint=True`).
        timeout: Keyword-only float, seconds any wait for the other workers
            may take (agreeing on a backup, loading it, finishing). A worker
            that does not arrive in time raises `ft.errors.BarrierTimeoutError`
            instead of hanging. Defaults to 300.
        async_save: Keyword-only boolean or None. `True` writes, fsyncs and
            commits each backup on a background thread while training goes
            on (training waits only for a copy of the state made where it
            lives: on the device for JAX on a GPU or TPU, a memcpy on the
            CPU). At most one save is in flight: a save that comes due while
            the last one is still being written moves to the first step after
            it commits (counted in `stats`), so training never stalls; with
            several workers the chief's write decides, for all of them. A background
            error surfaces at the next save or at the end of `fit`, and `fit`
            returns only once the last backup is committed (a save still due
            then is made when the backup is kept, and dropped when
            `delete_checkpoint` deletes it anyway). `False` saves
            synchronously. `None` (the default) goes to the background for
            states of 32 MiB and more, where it pays, and saves small states
            synchronously (milliseconds). Under JAX multi-host every
            process writes its own shards this way, from a device copy.

    Attributes:
        stats: `ft.report.SaveStats` of the current (or last) `fit`: backups
            committed, seconds the training thread was blocked, saves moved
            to a later step and by how many steps.
    """

    def __init__(
        self,
        backup_dir: str | os.PathLike[str],
        save_freq: str | int | bool = "epoch",
        double_checkpoint: bool = False,
        delete_checkpoint: bool = True,
        save_before_preemption: bool = False,
        *,
        max_to_keep: int = 1,
        timeout: float = strategies.DEFAULT_TIMEOUT,
        async_save: bool | None = None,
    ) -> None:
        super().__init__()
        backup_dir = arguments.checked_backup_dir(backup_dir)
        arguments.checked_save_freq(save_freq, save_before_preemption)
        self.backup_dir: str = backup_dir
        self.save_freq = save_freq
        self.double_checkpoint: bool = bool(double_checkpoint)
        self.max_to_keep: int = arguments.checked_max_to_keep(max_to_keep)
        keep = max(self.max_to_keep, 2) if self.double_checkpoint else self.max_to_keep
        # Refuses a backup_dir no store supports (gs://, s3:// for now), before any work.
        self._store: BackupStore = open_store(self.backup_dir, max_to_keep=keep)
        self.delete_checkpoint: bool = bool(delete_checkpoint)
        self.save_before_preemption: bool = bool(save_before_preemption)
        self.timeout: float = arguments.checked_timeout(timeout)
        self.async_save: bool | None = arguments.checked_async_save(async_save)
        self._coordinator: strategies.Coordinator = strategies.SingleProcess()
        self._preemption: preemption.PreemptionWatch | None = None
        self._pipeline: save_pipeline.SavePipeline = save_pipeline.for_directory(self.backup_dir)
        self._snapshotter: Snapshotter = Snapshotter()
        self.stats: report.SaveStats = report.SaveStats()
        self._fit_start: float = time.monotonic()
        self._schedule: SaveSchedule = SaveSchedule(save_freq)
        self._fit_exit: fit_exit.FitExit | None = None
        self._preempted: bool = False
        self.restored: dict[str, Any] | None = None
        self._epoch_iterator: Any = None
        self._resume: BackupRecord | None = None
        self._pending_metrics: list[Any] | None = None
        self._input: InputState | None = None
        self._undo_step_hook: Any = None

    # ------------------------------------------------------------- fit hooks
    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.stats = report.SaveStats()
        self._fit_start = time.monotonic()
        saving.wait_for_earlier_fit(self._pipeline, self.timeout)
        model = self.model
        # Undone however this fit ends (Keras calls on_train_end only when it completes).
        self._fit_exit = fit_exit.on_fit_exit(model, self._undo_fit_hooks)
        try:
            self._begin(model)
        except BaseException:
            # Keras does not wrap on_train_begin: undo (and unlock) here.
            fit_exit.run_quietly(self._fit_exit)
            raise

    def _begin(self, model: Any) -> None:
        """Coordinate, lock, restore and install this fit's hooks. Every process."""
        self._coordinator = strategies.coordinator_for(model)
        self._coordinator.begin(self.timeout)  # names unique to this fit
        log.set_process_index(self._coordinator.process_index)
        self._epoch_iterator = fit_loop.require_epoch_iterator(model)
        self._input = InputState(self._epoch_iterator)
        self._schedule = SaveSchedule(self.save_freq)
        self._resume = None
        self._pending_metrics = None
        self.restored = None
        restored = restore.restore_newest_intact(
            model, self._store, self._coordinator, self.timeout, self._input, self._epoch_iterator
        )
        if restored is not None:
            self._apply_restored(restored)
        # Nobody trains (and the chief replaces no backup) until all have loaded.
        self._coordinator.barrier("restored", self.timeout)
        self._preempted = False
        self._undo_step_hook = fit_loop.at_each_step_end(model, self._step_ended)
        if self._coordinator.num_processes > 1:
            fit_loop.guard_train_function(model, self._coordinator)
        if self.save_before_preemption:
            stride = getattr(model, "steps_per_execution", 1)
            self._preemption = preemption.watch(
                self._coordinator, self.timeout, stride, self._schedule.step
            )
        how = report.how_saved(
            self.async_save,
            strategies.every_process_writes(self._coordinator),
            report.state_nbytes(training_state.live_variables(model)),
            ASYNC_THRESHOLD_BYTES,
        )
        often = report.how_often(self.save_freq, self.save_before_preemption)
        logger.info(report.begin_message(self._store.directory, often, how, self.restored))

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        model = self.model
        resume, self._resume = self._resume, None
        model._initial_epoch = None  # honoured once, by this fit only
        assert self._input is not None
        batch = 0
        if resume is not None and resume.epoch == epoch:
            if self._pending_metrics is not None:
                training_state.assign(model.metrics_variables, self._pending_metrics)
            batch = self._input.resume_epoch(resume)
        self._schedule.epoch_begins(epoch, batch)
        self._pending_metrics = None
        self._input.epoch_begins()

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        assert self._input is not None
        self._schedule.batch_begins(batch)
        self._input.batch_begins(batch)

    # No `on_train_batch_end` (Keras would wait for every step's logs before
    # calling it): `fit_loop.at_each_step_end` calls this at the same place.
    def _step_ended(self, batch: int) -> None:
        """Count the step that ended at `batch`; save if due. Every process, training thread."""
        assert self._input is not None
        schedule = self._schedule
        self._input.batch_ended()
        schedule.step_ended(batch)
        stop_at = self._preemption.stop_step(schedule.step) if self._preemption else None
        # The first boundary at or after the agreed step: the same one on every worker.
        preempt = stop_at is not None and schedule.step >= stop_at
        if schedule.due and self._pipeline.busy():
            # Keras does not wait for each step's logs, so under JAX this thread
            # may be steps ahead of the device: while a save is due, decide at
            # device time whether the one in flight still needs the steps a move
            # gives it (a sync per step only while a save waits).
            training_state.wait_for_device(self.model)
        if preempt or (schedule.due and not self._must_move()):
            self._save(*schedule.position(fit_loop.num_batches(self._epoch_iterator)))
        if preempt:
            self._preempted = True
            self.model.stop_training = True

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        # After a preemption save, Keras still ends the cut-short epoch: that is
        # not a completed epoch, and the backup already holds the right batch.
        if self._schedule.at_epoch_end and not self._preempted:
            self._schedule.mark_due()
            if not self._must_move():
                self._save(epoch=epoch + 1, batch=0, at_epoch_end=True)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._fit_exit is not None:
            fit_exit_, self._fit_exit = self._fit_exit, None
            fit_exit_()
        fit_end.complete(
            schedule=self._schedule,
            save=self._save,
            num_batches=fit_loop.num_batches(self._epoch_iterator),
            store=self._store,
            coordinator=self._coordinator,
            pipeline=self._pipeline,
            snapshotter=self._snapshotter,
            stats=self.stats,
            delete_checkpoint=self.delete_checkpoint,
            preempted=self._preempted,
            timeout=self.timeout,
            fit_start=self._fit_start,
        )
        if self._preempted:
            preemption.exit_preempted(self._schedule.step)

    def _undo_fit_hooks(self) -> None:
        """Undo what on_train_begin installed for this fit; runs once, by any exit path."""
        if self._fit_exit is not None:  # not from on_train_end: fit is raising
            saving.attach_background_error(self._pipeline, sys.exc_info()[1])
            # Another run (or this process's next fit) may use backup_dir once the
            # save in flight, if any, has committed.
            self._pipeline.when_idle(self._store.unlock)
        self.model._initial_epoch = None
        fit_loop.unguard_train_function(self.model)
        if self._undo_step_hook is not None:
            self._undo_step_hook()
            self._undo_step_hook = None
        if self._preemption is not None:
            self._preemption.uninstall()
            self._preemption = None

    # --------------------------------------------------------------- helpers
    def _must_move(self) -> bool:
        """True when a due save moves to a later step. Call on all processes at the same step."""
        return saving.save_moves(self._coordinator, self._pipeline, self.timeout)

    def _save(self, epoch: int, batch: int, at_epoch_end: bool) -> None:
        """Back up the state at this step. Call on all processes; the chief writes.

        Every worker reaches the same step (the schedule depends only on the
        step count) and takes the snapshot, since reading a distributed
        variable can be a collective that all workers must join; the replicas
        hold the same state, so the chief's copy is the group's.
        """
        start = time.perf_counter()
        moved = self._schedule.saved()
        if moved:
            self.stats.add_moved(moved)
        try:
            variables = training_state.live_variables(self.model)
            saving.save_now(
                variables,
                store=self._store,
                coordinator=self._coordinator,
                pipeline=self._pipeline,
                snapshotter=self._snapshotter,
                input_state=self._input,
                stats=self.stats,
                step=self._schedule.step,
                epoch=epoch,
                batch=batch,
                at_epoch_end=at_epoch_end,
                async_save=self.async_save,
                timeout=self.timeout,
            )
        finally:
            self.stats.add_blocked(time.perf_counter() - start)

    def _apply_restored(self, restored: restore.Restored) -> None:
        """Resume from what `restore.restore_newest_intact` loaded. Call on all processes."""
        record = restored.record
        self._pending_metrics = restored.pending_metrics
        self._schedule.start(record.step)
        self._resume = record
        self.model._initial_epoch = record.epoch
        self.restored = {
            "epoch": record.epoch,
            "batch": record.batch,
            "step": record.step,
            "path": restored.path,
        }
