"""`ft.schedule.SaveSchedule`: the step count, the save due, and where a backup resumes."""

from __future__ import annotations

import pytest

from ft import errors
from ft.schedule import SaveSchedule


def run_steps(schedule: SaveSchedule, batches: range) -> list[int]:
    """End a step at each batch of `batches`; the steps at which a save was due and taken."""
    taken = []
    for batch in batches:
        schedule.batch_begins(batch)
        schedule.step_ended(batch)
        if schedule.due:
            taken.append(schedule.step)
            assert schedule.saved() is None  # taken when due: not moved
    return taken


def test_saves_fall_due_every_save_freq_steps_across_epochs() -> None:
    schedule = SaveSchedule(4)
    schedule.start()
    schedule.epoch_begins(0)
    assert run_steps(schedule, range(6)) == [4]
    schedule.epoch_begins(1)
    assert run_steps(schedule, range(6)) == [8, 12]
    assert (schedule.step, schedule.last_saved_step, schedule.unsaved) == (12, 12, False)


def test_steps_per_execution_counts_every_batch_of_the_execution() -> None:
    schedule = SaveSchedule(5)
    schedule.start()
    schedule.epoch_begins(0)
    # Keras calls the batch hooks once per execution of 3 steps, with the last batch.
    assert run_steps(schedule, range(2, 12, 3)) == [6, 12]


def test_a_moved_save_reports_the_steps_it_moved_and_keeps_its_first_due_step() -> None:
    schedule = SaveSchedule(2)
    schedule.start()
    schedule.epoch_begins(0)
    for batch in range(5):  # due at step 2; not taken (one in flight) until step 5
        schedule.batch_begins(batch)
        schedule.step_ended(batch)
    assert (schedule.due_step, schedule.step) == (2, 5)
    assert schedule.saved() == 3
    assert (schedule.due, schedule.last_saved_step) == (False, 5)
    # The next save falls due at the next multiple after the last save, not before.
    schedule.batch_begins(5)
    schedule.step_ended(5)
    assert schedule.due
    assert schedule.drop_due() == 0
    assert schedule.drop_due() is None


def test_a_resumed_fit_counts_from_the_backups_step_and_batch() -> None:
    schedule = SaveSchedule(10)
    schedule.start(step=17)
    schedule.epoch_begins(2, batch=3)  # the backup was taken after batch 2 of epoch 2
    assert run_steps(schedule, range(3, 6)) == [20]
    assert (schedule.epoch, schedule.batch) == (2, 6)


def test_position_resumes_at_the_next_epoch_after_its_last_batch() -> None:
    schedule = SaveSchedule("epoch")
    schedule.start()
    schedule.epoch_begins(1)
    run_steps(schedule, range(3))
    assert schedule.position(num_batches=5) == (1, 3, False)
    run_steps(schedule, range(3, 5))
    assert schedule.position(num_batches=5) == (2, 0, True)
    # An input of unknown length: at the end of fit, the epoch is over.
    assert schedule.position(num_batches=None) == (1, 5, False)
    assert schedule.position(num_batches=None, fit_ended=True) == (2, 0, True)


def test_epoch_saves_and_no_periodic_saves() -> None:
    for save_freq in ("epoch", False):
        schedule = SaveSchedule(save_freq)
        schedule.start()
        schedule.epoch_begins(0)
        assert run_steps(schedule, range(50)) == []
        assert schedule.at_epoch_end == (save_freq == "epoch")
        assert schedule.unsaved
        schedule.mark_due()
        assert schedule.due_step == 50


def test_a_step_that_never_ended_is_refused() -> None:
    schedule = SaveSchedule(1)
    schedule.start()
    schedule.epoch_begins(0)
    schedule.batch_begins(0)
    with pytest.raises(errors.IncompatibleKerasError, match="began batch 1 after the step at"):
        schedule.batch_begins(1)
    # A new epoch forgets the last one's step.
    schedule.epoch_begins(1)
    schedule.batch_begins(0)


def test_start_forgets_the_last_fit() -> None:
    schedule = SaveSchedule(3)
    schedule.start()
    schedule.epoch_begins(4)
    run_steps(schedule, range(2))
    schedule.mark_due()
    schedule.start(step=7)
    assert (schedule.step, schedule.last_saved_step, schedule.due, schedule.epoch) == (
        7,
        7,
        False,
        0,
    )
