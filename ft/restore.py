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

    One process verifies the arrays while it reads them: a backup that
    fails that read is moved aside and the next older one is tried (none
    is moved when no older one is kept). With several processes the chief
    reads every array before it names the backup (`verify_all`), since
    the workers' reads cannot fall back together.
    """
    while True:
        path, record = agree_on_restore_point(store, coordinator, timeout)
        if path is None:
            return None
        try:
            return load(
                model, store, path, record or store.read_record(path), input_state, epoch_iterator
            )
        except errors.CheckpointCorruptedError as e:
            if coordinator.num_processes > 1 or not store.older_than(path):
                raise
            store.set_aside(path, e)


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
            found = store.latest(read_all=coordinator.num_processes > 1)
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


def load(
    model: Any,
    store: BackupStore,
    path: str,
    record: BackupRecord,
    input_state: InputState,
    epoch_iterator: Any,
) -> Restored:
    """Check the backup at `path` against `model` and assign its variables.

    Call on all processes.
    """
    record = input_state.settle(record)
    fit_loop.ensure_built(model, epoch_iterator)
    variables = training_state.live_variables(model)
    live = training_state.manifest(variables)
    saved = training_state.manifest_from_json(record.variables)
    training_state.check_compatible(saved, live, where=path)
    target = training_state.restore_target(variables, saved)
    arrays = store.read_arrays(path, target)
    training_state.assign(variables["model"], arrays["model"])
    training_state.assign(variables["optimizer"], arrays["optimizer"])
    pending_metrics: list[Any] | None = None
    if record.batch and training_state.first_mismatch(saved["metrics"], live["metrics"]) is None:
        pending_metrics = list(arrays["metrics"])
    return Restored(path, record, pending_metrics)
