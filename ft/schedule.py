"""Where a `fit` stands and when a backup is due: `ft.BackupAndRestore`'s bookkeeping.

Called on the training thread of every process, from the callback's Keras
events. The schedule depends only on the steps counted, so every worker
finds the same save due at the same step. Whether a due save is taken now
or moves to a later step (one still in flight) is the callback's decision;
this object remembers the step it came due at, so the move can be reported.
"""

from __future__ import annotations

from ft import fit_loop


class SaveSchedule:
    """The epoch, the batch within it, the global step, and the save due, if any.

    Args:
        save_freq: the callback's `save_freq`: `"epoch"`, a positive integer
            (a save every that many steps, counted across epochs), or `False`.
    """

    def __init__(self, save_freq: str | int | bool) -> None:
        self.every: int | None = None if isinstance(save_freq, (bool, str)) else int(save_freq)
        self.at_epoch_end: bool = save_freq == "epoch"
        self.step = 0  # steps trained, over every fit and resume
        self.last_saved_step = 0
        self.epoch = 0
        self.batch = 0  # batches of this epoch done
        self.due_step: int | None = None  # the step a save came due at, not yet taken
        self._began: int | None = None  # the batch the last step began at
        self._ended = False  # whether that step has ended

    def start(self, step: int = 0) -> None:
        """A `fit` begins, at global `step` (a restored backup's, else 0)."""
        self.step = self.last_saved_step = step
        self.epoch = self.batch = 0
        self.due_step = None

    def epoch_begins(self, epoch: int, batch: int = 0) -> None:
        """Epoch `epoch` begins at `batch` (a resumed epoch: the backup's batch)."""
        self.epoch, self.batch = epoch, batch
        self._began, self._ended = None, False

    def batch_begins(self, batch: int) -> None:
        """A step begins at `batch`. Raises `IncompatibleKerasError` when the
        last step never reached `step_ended` (`fit_loop.check_step_ended`)."""
        fit_loop.check_step_ended(batch, self._began, self._ended)
        self._began, self._ended = batch, False

    def step_ended(self, batch: int) -> None:
        """Count the step (or `steps_per_execution` steps) that ended at `batch`,
        and mark a save due when a multiple of `save_freq` was passed since the
        last save."""
        self._ended = True
        done = batch + 1
        self.step += max(done - self.batch, 0)
        self.batch = done
        if self.every and self.step // self.every > self.last_saved_step // self.every:
            self.mark_due()

    def mark_due(self) -> None:
        """A save is due now (kept at the step it first came due at)."""
        if self.due_step is None:
            self.due_step = self.step

    @property
    def due(self) -> bool:
        return self.due_step is not None

    @property
    def unsaved(self) -> bool:
        """Whether a step was trained since the last save, or a save is due."""
        return self.due or self.step > self.last_saved_step

    def saved(self) -> int | None:
        """A save of the current step is taken: the steps it had moved since it
        came due (None when it had not moved)."""
        moved = self.step - self.due_step if self.due_step is not None else 0
        self.due_step = None
        self.last_saved_step = self.step
        return moved or None

    def drop_due(self) -> int | None:
        """The due save is not taken (`fit` ended and the backups are deleted):
        the steps it had moved, None when none was due."""
        if self.due_step is None:
            return None
        moved, self.due_step = self.step - self.due_step, None
        return moved

    def position(self, num_batches: int | None, fit_ended: bool = False) -> tuple[int, int, bool]:
        """The epoch, batch and end-of-epoch flag a backup taken now resumes at.

        `num_batches`: the epoch's batches, when known.
        """
        done = self.batch
        if done == num_batches or (fit_ended and (num_batches is None or done > num_batches)):
            # The epoch's last batch: resume at the next epoch's start (a
            # Keras epoch with no batch left to run cannot end cleanly).
            return self.epoch + 1, 0, True
        return self.epoch, done, False
