"""Where ft reaches into Keras 3's `fit` loop, kept in one module.

Three hooks: resuming mid-epoch (below), building an unbuilt model before a
restore (`ensure_built`, since the TensorFlow trainer builds only at its first
step), and turning an engine's lost-peer error in a training step into
`PeerLostError` (`guard_train_function`).

Keras 3 has no "initial step": `fit` honours `model._initial_epoch` and always
starts an epoch at batch 0. To resume mid-epoch, ft finds the `EpochIterator`
of the running `fit` and, for the resumed epoch only, draws the batches that
were already trained from the input without training on them, so the loop,
the callbacks and the progress bar see the true batch index from there on.

The mid-epoch resume relies on Keras internals (`fit`'s local `epoch_iterator`, and
`EpochIterator._enumerate_iterator`, `_steps_seen`, `_current_iterator`).
`tests/test_fit_loop.py` fails the day Keras changes them; until then, if the
iterator cannot be found ft warns and resumes at the start of the epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from ft import errors


def find_epoch_iterator(model: Any) -> Any | None:
    """The `EpochIterator` of the `fit` call of `model` on this thread's stack, or None.

    Call from a callback hook that `fit` invoked (e.g. `on_train_begin`).
    """
    from keras.src.trainers.epoch_iterator import EpochIterator

    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            candidate = frame.f_locals.get("epoch_iterator")
            if isinstance(candidate, EpochIterator):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def data_position(epoch_iterator: Any, at_epoch_end: bool) -> int:
    """Batches drawn from the input iterator that the next batch will continue.

    Equal to the batch index within the epoch, except with `steps_per_epoch`
    on an input that is longer than one epoch: Keras then keeps one iterator
    across epochs and the position runs ahead of the batch index.
    """
    if epoch_iterator is None:
        return 0
    if at_epoch_end and (
        epoch_iterator.steps_per_epoch is None
        or epoch_iterator._current_iterator is None
        or (
            epoch_iterator._num_batches
            and epoch_iterator._steps_seen >= epoch_iterator._num_batches
        )
    ):
        return 0
    return int(epoch_iterator._steps_seen)


def start_next_epoch_at(epoch_iterator: Any, batch: int, position: int) -> None:
    """Make the next epoch of `epoch_iterator` start at `batch`.

    Draws `position` batches from a fresh input iterator and discards them,
    then yields steps from `batch` on; later epochs are untouched.
    """
    original = epoch_iterator._enumerate_iterator
    if batch == 0 and position == 0:
        return

    def resumed() -> Iterator[tuple[int, int, Any]]:
        try:
            first = True
            for begin, end, iterator in original():
                if first:
                    first = False
                    _discard(iterator, position - batch, batch)
                    epoch_iterator._steps_seen += max(position - batch, 0)
                if begin < batch:
                    _discard(iterator, end - begin + 1, batch)
                    continue
                yield begin, end, iterator
        finally:
            epoch_iterator.__dict__.pop("_enumerate_iterator", None)

    epoch_iterator._enumerate_iterator = resumed


def _discard(iterator: Any, count: int, batch: int) -> None:
    for _ in range(count):
        try:
            next(iterator)
        except StopIteration:
            raise errors.UnsupportedConfigurationError(
                f"The input ran out of data while skipping to batch {batch} of the resumed "
                "epoch. Resume with the same input (same data, batch size and "
                "steps_per_epoch) that the backed-up run used."
            ) from None


def num_batches(epoch_iterator: Any) -> int | None:
    return None if epoch_iterator is None else epoch_iterator.num_batches


def ensure_built(model: Any, epoch_iterator: Any) -> None:
    """Create every variable a restore assigns, as `fit` would at its first step.

    Keras's TensorFlow trainer defers building an unbuilt model to the first
    traced step, after `on_train_begin`; the JAX trainer builds before it.
    """
    unbuilt = not all(layer.built for layer in model._flatten_layers())
    metrics = getattr(model, "_compile_metrics", None)
    loss = getattr(model, "_compile_loss", None)
    if (
        unbuilt
        or (metrics is not None and not metrics.built)
        or (loss is not None and not loss.built)
    ):
        spec = None
        if epoch_iterator is not None and hasattr(epoch_iterator, "_distributed_dataset"):
            spec = epoch_iterator._distributed_dataset.element_spec
        if spec is None:
            raise errors.UnsupportedConfigurationError(
                f"The model {model.name} is not built, so the backup cannot be restored "
                "into it. Build it before calling fit(), e.g. by calling it on a batch "
                "of data or with `model.build(input_shape)`."
            )
        model._symbolic_build(data_batch=spec)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


def guard_train_function(model: Any, coordinator: Any) -> None:
    """Make a lost peer surface from a training step as `PeerLostError` naming it.

    The engines detect a dead or frozen peer (heartbeat, broken connection)
    and fail the step's collective; this turns their error into ft's.
    """
    unguard_train_function(model)
    original = model.train_function
    if original is None:
        return

    def guarded(*args: Any, **kwargs: Any) -> Any:
        where = (
            f"A training step on worker {coordinator.process_index} (its collective with "
            "every other worker)"
        )
        from ft.strategies import translate_engine_errors

        with translate_engine_errors(where, timeout=None):
            return original(*args, **kwargs)

    guarded._ft_original = original  # type: ignore[attr-defined]
    model.train_function = guarded


def unguard_train_function(model: Any) -> None:
    original = getattr(model.train_function, "_ft_original", None)
    if original is not None:
        model.train_function = original
