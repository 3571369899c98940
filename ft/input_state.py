"""Where the input of a running `fit` stands, and how a resumed `fit` gets back there.

Runs on every process. A backup records, besides the epoch and batch:
- `data_position`: batches drawn from the current input iterator (ahead of
  the batch index when `steps_per_epoch` keeps one iterator across epochs);
- `rng`: the host random state when that iterator started (`ft.host_rng`),
  which orders shuffled NumPy arrays on JAX and shuffled `PyDataset`s;
- `input_iteration`: how many input iterators the run had started before it,
  which orders a `tf.data` pipeline whose `shuffle` reshuffles each iteration.

A resumed `fit` restores the random state, starts the input over as many
times as the backed-up run had, and draws `data_position` batches without
training on them (`fit_loop.start_next_epoch_at`).
"""

from __future__ import annotations

from typing import Any

from ft import fit_loop, host_rng
from ft.log import get_logger
from ft.metadata import BackupRecord

logger = get_logger()


class InputState:
    """Tracks the input of one `fit` call. Call every method on all processes."""

    def __init__(self, epoch_iterator: Any) -> None:
        self._iterator = epoch_iterator
        self._started = 0  # input iterations the whole run has started
        self._fresh = False  # one started after the last trained batch
        self._lazy = True  # iterators start at their first batch, not when created
        self._rng: dict[str, Any] | None = None  # host RNG when the current one started
        self._expect_batch: int | None = None
        self._probed = 0  # iterators `settle` started on the input
        fit_loop.watch_new_iterators(epoch_iterator, self._new_iterator)

    def _new_iterator(self, lazy: bool) -> None:
        self._started += 1
        self._fresh = True
        self._lazy = lazy

    def settle(self, record: BackupRecord) -> BackupRecord:
        """`record`, or the start of the next epoch if the input ends at `record`'s batch.

        Call from `on_train_begin`, before `fit` picks its first epoch. A backup
        taken after the last batch of an epoch whose length Keras did not know
        yet resumes at that batch; Keras's JAX trainer fails on an epoch that
        then trains no batch, so the input is read ahead once to see whether
        anything is left.
        """
        import dataclasses

        import keras

        it = self._iterator
        if not (
            record.batch
            and record.data_position == record.batch
            and keras.backend.backend() == "jax"
            and it.steps_per_epoch is None
            and it._num_batches is None
        ):
            return record
        dataset = tf_dataset(it)
        if dataset is None:
            return record
        seeded, _ = reshuffles(dataset)
        if seeded and record.input_iteration == 0:
            return record  # reading ahead would change the resumed epoch's order
        probe = iter(dataset)
        self._probed = int(seeded > 0)
        available = 0
        while available <= record.batch and next(probe, None) is not None:
            available += 1
        if available != record.batch:
            return record  # more is left, or less (the skip reports that)
        return dataclasses.replace(
            record,
            epoch=record.epoch + 1,
            batch=0,
            data_position=0,
            input_iteration=record.input_iteration + 1,
        )

    def resume_epoch(self, record: BackupRecord) -> int:
        """Bring the epoch about to begin to `record`'s batch; returns that batch.

        Call from `on_epoch_begin` of the resumed epoch, before `epoch_begins`.
        """
        if record.rng is not None:
            host_rng.restore(record.rng)
        self._started = record.input_iteration
        self._warn_if_enqueuer_carries_batches(record)
        restart = self._replay_tf_data_iterations(record)
        if record.batch or record.data_position or restart is not None:
            fit_loop.start_next_epoch_at(
                self._iterator, record.batch, record.data_position, before_new_iterator=restart
            )
            self._expect_batch = record.batch
        return record.batch

    def epoch_begins(self) -> None:
        """Call from `on_epoch_begin`, after `resume_epoch` if any."""
        if fit_loop.iterator_starts_this_epoch(self._iterator):
            self._rng = host_rng.capture()

    def batch_begins(self, batch: int) -> None:
        """Call from `on_train_batch_begin`: checks the resumed epoch's first batch."""
        if self._expect_batch is not None:
            expected, self._expect_batch = self._expect_batch, None
            fit_loop.check_resumed_batch(batch, expected)

    def batch_ended(self) -> None:
        """Call as each step ends, before saving."""
        self._fresh = False

    def where(self, at_epoch_end: bool) -> tuple[int, dict[str, Any], int]:
        """`(data_position, rng, input_iteration)` for a backup taken now."""
        position = fit_loop.data_position(self._iterator, at_epoch_end)
        if position:
            if self._rng is None:
                raise fit_loop.incompatible(
                    "a batch was trained before ft saw the epoch's input begin"
                )
            return position, self._rng, self._started - 1
        return position, host_rng.capture(), self._next_iteration()

    def _next_iteration(self) -> int:
        """The index of the iterator the next batch draws from, at an epoch's end.

        Keras creates one when an epoch's loop ends on a spent input of known
        length (the TensorFlow trainer starts it at once), and another at the
        next epoch's start unless `steps_per_epoch` makes it keep that one.
        """
        pending = 0
        if not self._fresh and not self._lazy:
            pending = int(fit_loop.restarts_after_this_step(self._iterator))
        if self._iterator.steps_per_epoch is None:
            return self._started + pending
        if pending:
            return self._started  # Keras keeps the one it is about to create
        return self._started - 1 if self._fresh else self._started

    def _warn_if_enqueuer_carries_batches(self, record: BackupRecord) -> None:
        import keras

        adapter = getattr(self._iterator, "data_adapter", None)
        enqueuer = getattr(adapter, "enqueuer", None)
        if enqueuer is None or keras.backend.backend() != "jax" or record.epoch == 0:
            return
        logger.warning(
            "Not exact: with the JAX backend, a PyDataset with workers hands the batches "
            "it prefetched in one epoch to the next (Keras's OrderedEnqueuer keeps them "
            "when it stops, and fit starts the input once before epoch 0), so the first "
            "batches of the resumed epoch %d are not those the interrupted run drew. The "
            "resume skips the right number of batches (to batch %d). To make it exact, "
            "use the PyDataset with workers=1 and use_multiprocessing=False (the "
            "defaults), or the TensorFlow backend.",
            record.epoch,
            record.batch,
        )

    def _replay_tf_data_iterations(self, record: BackupRecord) -> Any:
        """A function that starts a reshuffling `tf.data` input over as often as the
        backed-up run had, or None when the input's order does not depend on it."""
        dataset = tf_dataset(self._iterator)
        if dataset is None:
            return None
        seeded, unseeded = reshuffles(dataset)
        if unseeded:
            logger.warning(
                "Not exact: the tf.data input has %d shuffle(s) without a seed that "
                "reshuffle each iteration, so the batches after this resume (epoch %d, "
                "batch %d) are not those the interrupted run would have drawn. The resume "
                "skips the right number of batches. To make it exact, pass `seed=` to "
                "`Dataset.shuffle` or call `keras.utils.set_random_seed` before building "
                "the dataset, or shuffle NumPy arrays through `fit(shuffle=True)`.",
                unseeded,
                record.epoch,
                record.batch,
            )
        if not seeded or not record.input_iteration:
            return None
        target = getattr(self._iterator, "_distributed_dataset", dataset)
        count = record.input_iteration - self._probed

        def restart() -> None:
            # Each new iterator draws the next reshuffle seed of the dataset.
            for _ in range(count):
                iter(target)
            logger.debug("started the tf.data input over %d times to reach its order", count)

        return restart


def tf_dataset(epoch_iterator: Any) -> Any | None:
    """The `tf.data.Dataset` that `fit` iterates, or None for other inputs."""
    adapter = getattr(epoch_iterator, "data_adapter", None)
    if type(adapter).__name__ != "TFDatasetAdapter":
        return None
    return getattr(adapter, "_dataset", None)


def reshuffles(dataset: Any) -> tuple[int, int]:
    """Shuffles in `dataset`'s pipeline that reshuffle each iteration: (seeded, unseeded).

    Seeded counts those with a seed of their own or from the global seed
    (`tf.random.set_seed`, `keras.utils.set_random_seed`). Shuffles inside
    functions (`interleave`, `flat_map`) are not seen.
    """
    seeded = unseeded = 0
    stack, seen = [dataset], set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if "ShuffleDataset" in type(node).__name__ and getattr(
            node, "_reshuffle_each_iteration", False
        ):
            seeds = (getattr(node, "_seed", 0), getattr(node, "_seed2", 0))
            if any(int(s) != 0 for s in seeds):
                seeded += 1
            else:
                unseeded += 1
        inputs = getattr(node, "_inputs", None)
        if callable(inputs):
            stack.extend(inputs())
    return seeded, unseeded
