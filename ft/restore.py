"""The restore path of `ft.BackupAndRestore`: agree on a backup, check it, load it.

Call on all processes. The chief picks the newest intact backup and every
worker loads the same one; the callback then applies the returned `Restored`
to its own position (step, epoch, batch, pending metric values).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ft.strategies as strategies
from ft import errors, fit_loop, training_state
from ft.input_state import InputState
from ft.metadata import BackupRecord
from ft.store import BackupStore
from ft.store.base import ReadAll


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a restore loaded: the backup's path, its (settled) record, and the
    metric accumulators to assign when the interrupted epoch begins (None when
    the backup was taken at an epoch boundary or the metrics do not match)."""

    path: str
    record: BackupRecord
    pending_metrics: list[Any] | None


def restore_newest_intact(
    model: Any,
    store: BackupStore,
    coordinator: strategies.Coordinator,
    timeout: float,
    input_state: InputState,
    epoch_iterator: Any,
) -> Restored | None:
    """Load the newest intact backup, if any. Call on all processes.

    Every process checks the arrays it reads as it reads them (a crc32c per
    array, or per chunk): a backup that fails that read is moved aside and
    the next older one is tried (none is moved when no older one is kept).
    With several processes, each reads only what it loads (under JAX
    multi-host, its own shards) and they then agree (`_agree_on_reads`)
    before any assigns: all go on, or all fall back together. The one case
    the reads cannot check, a backup with array crc32cs loaded onto arrays
    sharded across processes, is read whole by the chief first.
    """
    while True:
        path, record = agree_on_restore_point(store, coordinator, timeout)
        if path is None:
            return None
        if coordinator.num_processes == 1:
            try:
                record = record or store.read_record(path)
                return apply(read(model, store, path, record, input_state, epoch_iterator))
            except errors.CheckpointCorruptedError as e:
                if not store.older_than(path):
                    raise
                store.set_aside(path, e)
            continue
        loaded: Loaded | None = None
        failure: Exception | None = None
        try:
            record = record or store.read_record(path)
            loaded = read(model, store, path, record, input_state, epoch_iterator)
        except Exception as e:  # every process learns of it before any assigns
            failure = e
        if _agree_on_reads(store, coordinator, timeout, path, failure):
            assert loaded is not None
            return apply(loaded)


def _agree_on_reads(
    store: BackupStore,
    coordinator: strategies.Coordinator,
    timeout: float,
    path: str,
    failure: Exception | None,
) -> bool:
    """True when every process read the backup at `path`; False when one found it
    damaged and the chief has set it aside (try the next older one). Call on
    all processes, after each has read (`failure`: what its read raised).

    Raises:
        The process's own `failure`, or on the others `CheckpointCorruptedError`
        (the backup is damaged and no older one is kept) or `WorkerFailedError`
        (a process failed otherwise), naming the worker.
    """
    if failure is None:
        mine = "ok"
    else:
        kind = "damaged" if isinstance(failure, errors.CheckpointCorruptedError) else "failed"
        mine = json.dumps({"kind": kind, "error": f"{type(failure).__name__}: {failure}"[:2000]})
    reports = coordinator.gather("restore-read", mine, timeout)
    verdict: str | None = None
    if reports is not None:  # the chief
        verdict = _verdict(store, path, reports)
    decided = json.loads(coordinator.broadcast("restore-verdict", verdict, timeout))
    if decided["kind"] == "ok":
        return True
    if decided["kind"] == "damaged" and decided["retry"]:
        return False
    if failure is not None:
        raise failure
    message = f"Worker {decided['worker']} could not load the backup {path}: {decided['error']}"
    if decided["kind"] == "damaged":
        raise errors.CheckpointCorruptedError(message)
    raise errors.WorkerFailedError(message + ". This worker stops too instead of training alone.")


def _verdict(store: BackupStore, path: str, reports: list[str]) -> str:
    """The chief's decision from every process's report of its read, as JSON:
    "ok", "damaged" (set aside here when an older backup is kept: `retry`), or
    "failed", with the first failing worker and its error."""
    failed = [(i, json.loads(r)) for i, r in enumerate(reports) if r != "ok"]
    if not failed:
        return json.dumps({"kind": "ok"})
    worst = next(((i, r) for i, r in failed if r["kind"] == "failed"), failed[0])
    worker, report = worst
    decided = {"kind": report["kind"], "worker": worker, "error": report["error"], "retry": False}
    if report["kind"] == "damaged" and store.older_than(path):
        try:
            why = f"worker {worker} found it damaged as it read it: {report['error']}"
            store.set_aside(path, errors.CheckpointCorruptedError(why))
            decided["retry"] = True
        except OSError as e:
            decided.update(kind="failed", worker=0, error=f"setting {path} aside: {e}")
    return json.dumps(decided)


def _read_whole_first(coordinator: strategies.Coordinator) -> ReadAll:
    """Whether the chief must read every array of a backup before naming it: under
    JAX multi-host the arrays are read as shards, which a backup's per-array
    crc32cs (written by one process holding them whole) cannot check. Backups
    written with a crc32c on every chunk are checked by each process's own
    read."""
    if coordinator.num_processes == 1 or not strategies.every_process_writes(coordinator):
        return False
    return lambda record: bool(record.array_crc32c)


def agree_on_restore_point(
    store: BackupStore, coordinator: strategies.Coordinator, timeout: float
) -> tuple[str | None, BackupRecord | None]:
    """The chief picks the newest intact backup; every worker learns which.

    Call on all processes. The chief alone creates, locks and cleans
    `backup_dir`; a failure there reaches the other workers as
    `ChiefFailedError` instead of leaving them waiting.
    """
    found: tuple[str, BackupRecord] | None = None
    failure: Exception | None = None
    decision: str | None = None
    if coordinator.is_chief:
        try:
            store.prepare()
            store.lock()
            store.remove_partial()
            found = store.latest(read_all=_read_whole_first(coordinator))
            decision = json.dumps({"path": found[0] if found else None})
        except (errors.FTError, OSError) as e:
            failure = e
            decision = json.dumps({"error": f"{type(e).__name__}: {e}"})
    decision = coordinator.broadcast("restore-point", decision, timeout)
    if failure is not None:
        raise failure
    chosen = json.loads(decision)
    if "error" in chosen:
        raise errors.ChiefFailedError(
            f"The chief could not use backup_dir {store.directory}: {chosen['error']}"
        )
    if found is not None:
        return found
    return chosen["path"], None


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What `read` read, not yet assigned to the model."""

    path: str
    record: BackupRecord
    variables: dict[str, list[Any]]
    arrays: dict[str, list[Any]]
    pending_metrics: bool  # the metric accumulators are to be resumed


def read(
    model: Any,
    store: BackupStore,
    path: str,
    record: BackupRecord,
    input_state: InputState,
    epoch_iterator: Any,
) -> Loaded:
    """Check the backup at `path` against `model` and read its arrays, checksums
    checked; nothing is assigned yet. Call on all processes.

    Raises:
        CheckpointCorruptedError: when what this process reads is damaged.
        IncompatibleCheckpointError: when the backup is of another model.
    """
    record = input_state.settle(record)
    fit_loop.ensure_built(model, epoch_iterator)
    variables = training_state.live_variables(model)
    live = training_state.manifest(variables)
    saved = training_state.manifest_from_json(record.variables)
    training_state.check_compatible(saved, live, where=path)
    target = training_state.restore_target(variables, saved)
    arrays = store.read_arrays(path, target)
    metrics_match = training_state.first_mismatch(saved["metrics"], live["metrics"]) is None
    return Loaded(path, record, variables, arrays, bool(record.batch) and metrics_match)


def apply(loaded: Loaded) -> Restored:
    """Assign what `read` read to the model's variables. Call on all processes."""
    training_state.assign(loaded.variables["model"], loaded.arrays["model"])
    training_state.assign(loaded.variables["optimizer"], loaded.arrays["optimizer"])
    pending = list(loaded.arrays["metrics"]) if loaded.pending_metrics else None
    return Restored(loaded.path, loaded.record, pending)
