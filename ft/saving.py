"""The save path of `ft.BackupAndRestore`: build, submit and wait for a backup's write.

Call `save_now` on all processes at the same step: every worker takes the
snapshot (reading a distributed variable can be a collective), and the chief
alone writes it, unless every process writes its own shards (JAX multi-host).
A background save's error is attached to the exception that ends `fit`.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import keras

import ft.strategies as strategies
from ft import errors, report, save_pipeline, training_state
from ft.input_state import InputState
from ft.log import get_logger
from ft.metadata import BackupRecord
from ft.snapshot import Snapshotter
from ft.store import BackupStore

logger = get_logger()

# States this large are saved in the background when `async_save=None`.
ASYNC_THRESHOLD_BYTES = 32 << 20


def save_now(
    variables: dict[str, list[Any]],
    *,
    store: BackupStore,
    coordinator: strategies.Coordinator,
    pipeline: save_pipeline.SavePipeline,
    snapshotter: Snapshotter,
    input_state: InputState | None,
    stats: report.SaveStats,
    step: int,
    epoch: int,
    batch: int,
    at_epoch_end: bool,
    async_save: bool | None,
    timeout: float,
) -> None:
    """Snapshot `variables` (the live state at `step`) and write or submit its backup.

    Call on all processes.
    """
    if strategies.every_process_writes(coordinator):
        _save_shards(
            variables,
            store,
            coordinator,
            pipeline,
            snapshotter,
            stats,
            async_save,
            timeout,
            build_record(input_state, coordinator, step, epoch, batch, at_epoch_end, variables),
        )
        return
    if coordinator.is_chief:
        # At most one save in flight: its buffers are reused by this snapshot.
        pipeline.wait(timeout)
    snapshot = snapshotter.take(variables)
    if not coordinator.is_chief:
        return
    record = build_record(input_state, coordinator, step, epoch, batch, at_epoch_end, variables)

    def write(arrays: dict[str, Any]) -> str:
        path = store.write(record, arrays)
        logger.debug(
            "committed epoch %d, batch %d (step %d) to %s", epoch, batch, record.step, path
        )
        return path

    background = async_save
    if background is None:
        background = snapshot.nbytes >= ASYNC_THRESHOLD_BYTES
    pipeline.run(step, snapshot, write, stats, background, timeout)


def _save_shards(
    variables: dict[str, list[Any]],
    store: BackupStore,
    coordinator: strategies.Coordinator,
    pipeline: save_pipeline.SavePipeline,
    snapshotter: Snapshotter,
    stats: report.SaveStats,
    async_save: bool | None,
    timeout: float,
    record: BackupRecord,
) -> None:
    """Every process writes its own shards (JAX multi-host). Call on all processes.

    In the background, each process's pipeline writes a device copy of the
    state on its own thread, and the processes meet through that thread's own
    barriers and keys. Synchronously, or when the device has no room for the
    copy, the live arrays are written here, before training goes on.
    """
    pipeline.wait(timeout)  # one save in flight per process
    saves = coordinator.for_thread("saves")

    def write(arrays: dict[str, Any]) -> str:
        path = store.write_collective(record, arrays, saves, timeout)
        logger.debug(
            "committed epoch %d, batch %d (step %d) to %s",
            record.epoch,
            record.batch,
            record.step,
            path,
        )
        return path

    background = async_save
    if background is None:
        # The global size, from the shapes: the same decision on every process.
        background = report.state_nbytes(variables) >= ASYNC_THRESHOLD_BYTES
    snapshot = snapshotter.take_sharded(variables) if background else None
    if snapshot is not None:
        pipeline.run(record.step, snapshot, write, stats, True, timeout)
        return
    arrays = training_state.live_values(variables)
    began = time.perf_counter()
    write(arrays)
    stats.add_commit(training_state.nbytes(arrays), time.perf_counter() - began)


def save_moves(
    coordinator: strategies.Coordinator, pipeline: save_pipeline.SavePipeline, timeout: float
) -> bool:
    """True when a save due now moves to a later step because one is still in flight.

    Call on all processes at the same step. The chief decides for every
    worker (a key in the engine's store, once per step while a save is due):
    all of them save at the same later step, and none waits for the write.
    Where every process writes its own shards (JAX multi-host), the chief's
    write is the last of a backup to end (it commits after the others have
    written), so its pipeline speaks for all of them too.
    """
    if coordinator.num_processes == 1:
        return pipeline.busy()
    busy = ("1" if pipeline.busy() else "0") if coordinator.is_chief else None
    return coordinator.decide("move-save", busy, timeout) == "1"


def build_record(
    input_state: InputState | None,
    coordinator: strategies.Coordinator,
    step: int,
    epoch: int,
    batch: int,
    at_epoch_end: bool,
    variables: dict[str, list[Any]],
) -> BackupRecord:
    """The JSON record of a backup at `step`: position, input order, variable manifest."""
    assert input_state is not None
    position, rng, input_iteration = input_state.where(at_epoch_end)
    return BackupRecord(
        epoch=epoch,
        batch=batch,
        step=step,
        data_position=position,
        backend=keras.backend.backend(),
        num_processes=coordinator.num_processes,
        written_at=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        variables=training_state.manifest_to_json(training_state.manifest(variables)),
        rng=rng,
        input_iteration=input_iteration,
    )


def wait_for_earlier_fit(pipeline: save_pipeline.SavePipeline, timeout: float) -> None:
    """Wait for a save that an earlier `fit` of this `backup_dir` left in flight."""
    try:
        pipeline.wait(timeout)
    except errors.SaveTimeoutError:
        raise
    except BaseException as e:
        # That fit ended with an exception of its own; this error was logged
        # when it happened. Its backup is lost, the one before it is intact.
        logger.warning(
            "the backup left in flight by an earlier fit failed (%s: %s); "
            "continuing from the newest committed backup",
            type(e).__name__,
            e,
        )


def attach_background_error(
    pipeline: save_pipeline.SavePipeline, ending: BaseException | None
) -> None:
    """Chain a background save's error to the exception that ends `fit`, never drop it.

    A save still in flight logs its error when it fails instead.
    """
    error = pipeline.take_error()
    if error is None or ending is None or error is ending:
        if error is not None:
            logger.error("a background save failed: %s: %s", type(error).__name__, error)
        return
    if ending.__context__ is None:
        ending.__context__ = error
    if hasattr(ending, "add_note"):  # Python 3.11+
        ending.add_note(f"ft: a background save had failed too: {type(error).__name__}: {error}")
