"""Where ft reaches into Keras 3's `fit` loop, kept in one module.

Four hooks: resuming mid-epoch (below), building an unbuilt model before a
restore (`ensure_built`, since the TensorFlow trainer builds only at its first
step), seeing each step end without a callback's `on_train_batch_end`, which
costs a device sync per step (`at_each_step_end`), and turning an engine's
lost-peer error in a training step into `PeerLostError` (`guard_train_function`).

Keras 3 has no "initial step": `fit` honours `model._initial_epoch` and always
starts an epoch at batch 0. To resume mid-epoch, ft finds the `EpochIterator`
of the running `fit` and, for the resumed epoch only, draws the batches that
were already trained from the input without training on them, so the loop,
the callbacks and the progress bar see the true batch index from there on.

The mid-epoch resume relies on Keras internals (`fit`'s local `epoch_iterator`,
and `EpochIterator._enumerate_iterator`, `_get_iterator`, `_steps_seen`,
`_current_iterator`, `_num_batches`). They are checked at run time: a missing
one, a skip that did not draw the batches it meant to, or a resumed epoch
that does not start at the saved batch raises `IncompatibleKerasError` naming
the installed Keras version, never a silent replay. `tests/test_fit_loop.py`
drives a real `fit` on both backends to see such a change first.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ft import errors

# What ft reads or replaces on Keras's EpochIterator.
ITERATOR_ATTRIBUTES = (
    "_enumerate_iterator",
    "_get_iterator",
    "_steps_seen",
    "_current_iterator",
    "_num_batches",
    "steps_per_epoch",
    "steps_per_execution",
    "num_batches",
    "data_adapter",
)


def keras_version() -> str:
    import keras

    return str(keras.version())


def incompatible(what: str) -> errors.IncompatibleKerasError:
    """The error for a Keras internal that no longer behaves as ft relies on."""
    return errors.IncompatibleKerasError(
        f"Keras {keras_version()} changed an internal that ft's mid-epoch resume relies "
        f"on: {what}. Resuming would train on the wrong batches, so ft stops instead. "
        "Install a Keras version ft supports (see ft's pyproject.toml) or use "
        'save_freq="epoch" with a fresh backup_dir, and report this at ft\'s issue tracker.'
    )


def fit_local(model: Any, name: str, kind: type) -> Any | None:
    """Local `name` of the `fit` call of `model` on this thread's stack, if a `kind`."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "fit" and frame.f_locals.get("self") is model:
            candidate = frame.f_locals.get(name)
            if isinstance(candidate, kind):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def find_epoch_iterator(model: Any) -> Any | None:
    """The `EpochIterator` of the `fit` call of `model` on this thread's stack, or None.

    Call from a callback hook that `fit` invoked (e.g. `on_train_begin`).
    """
    from keras.src.trainers.epoch_iterator import EpochIterator

    return fit_local(model, "epoch_iterator", EpochIterator)


def at_each_step_end(model: Any, on_step_end: Callable[[int], None]) -> Callable[[], None]:
    """Run `on_step_end(batch)` on the training thread as each step of `fit` ends,
    before any callback's `on_train_batch_end`. Returns the undo.

    Call from `on_train_begin`. ft does not override `on_train_batch_end`:
    Keras turns every step's logs into Python floats before it calls a
    callback that does, which waits for the step to finish on the device and
    keeps the host from queuing the next one (with none, and a backend that
    allows it, JAX, it hands the logs to the callbacks on a thread pool and
    goes on). Wrapping this `fit`'s
    `CallbackList.on_train_batch_end`, on that instance only, sees every step
    end at the same place without that wait.

    Raises:
        IncompatibleKerasError: `fit` has no local `callbacks` of type `CallbackList`.
    """
    import keras

    callbacks = fit_local(model, "callbacks", keras.callbacks.CallbackList)
    if callbacks is None:
        raise incompatible("`Model.fit` has no local `callbacks` of type `CallbackList`")
    had_own = "on_train_batch_end" in vars(callbacks)
    original = callbacks.on_train_batch_end

    def on_train_batch_end(batch: int, logs: Any = None) -> Any:
        on_step_end(batch)
        return original(batch, logs)

    on_train_batch_end._ft_original = original  # type: ignore[attr-defined]
    callbacks.on_train_batch_end = on_train_batch_end
    # Weak references only: the callback holding the undo must not keep `fit`'s
    # CallbackList alive (its end is when ft undoes a fit that raised elsewhere).
    ref, wrapper = weakref.ref(callbacks), weakref.ref(on_train_batch_end)

    def undo() -> None:
        target = ref()
        if target is None:
            return
        installed: Any = vars(target).get("on_train_batch_end")
        if installed is not None and installed is wrapper():
            if had_own:
                target.on_train_batch_end = vars(installed)["_ft_original"]
            else:
                del target.on_train_batch_end

    return undo


def check_step_ended(batch: int, began: int | None, ended: bool) -> None:
    """Raise unless the step that began at batch `began` ended before batch `batch` began.

    Call from `on_train_batch_begin`: catches a `fit` that no longer calls its
    `CallbackList.on_train_batch_end` after each step (`at_each_step_end`).
    """
    if began is not None and not ended:
        raise incompatible(
            f"`fit` began batch {batch} after the step at batch {began} without calling "
            "its `CallbackList.on_train_batch_end`, where ft saves"
        )


def require_epoch_iterator(model: Any) -> Any:
    """`find_epoch_iterator`, checked: raises `IncompatibleKerasError` when it is not there.

    Call from `on_train_begin`. Without the iterator ft can neither resume
    mid-epoch nor know where the input stands, so it fails before training.
    """
    found = find_epoch_iterator(model)
    if found is None:
        raise incompatible("`Model.fit` has no local `epoch_iterator` of type `EpochIterator`")
    missing = [name for name in ITERATOR_ATTRIBUTES if not hasattr(found, name)]
    if missing:
        raise incompatible(f"`EpochIterator` has no {', '.join(missing)}")
    return found


def watch_new_iterators(epoch_iterator: Any, on_start: Callable[[bool], None]) -> None:
    """Call `on_start(lazy)` each time `fit` starts iterating its input anew.

    The TensorFlow trainer iterates a `tf.data` dataset as soon as Keras
    creates the iterator (`lazy=False`); the JAX trainer gets a generator that
    starts at its first `next` (`lazy=True`), and Keras discards unstarted
    ones, so those are not counted.
    """
    original = epoch_iterator._get_iterator

    def get_iterator() -> Any:
        source = original()
        if inspect.isgenerator(source):
            return _started_by(source, on_start)
        on_start(False)
        return source

    epoch_iterator._get_iterator = get_iterator


def _started_by(source: Iterator[Any], on_start: Callable[[bool], None]) -> Iterator[Any]:
    on_start(True)
    yield from source


def restarts_after_this_step(epoch_iterator: Any) -> bool:
    """Whether Keras creates a new input iterator when the epoch's loop ends after
    the step that just ran (it does when the input's length is known and spent)."""
    return bool(
        epoch_iterator._current_iterator is not None
        and epoch_iterator._num_batches
        and epoch_iterator._steps_seen >= epoch_iterator._num_batches
    )


def iterator_starts_this_epoch(epoch_iterator: Any) -> bool:
    """Whether the epoch about to begin draws from a new input iterator.

    Call from `on_epoch_begin`. Keras keeps one iterator across epochs only
    with `steps_per_epoch`, until the input is exhausted.
    """
    return (
        epoch_iterator.steps_per_epoch is None
        or epoch_iterator._current_iterator is None
        or epoch_iterator._steps_seen == 0
    )


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


def start_next_epoch_at(
    epoch_iterator: Any,
    batch: int,
    position: int,
    before_new_iterator: Callable[[], None] | None = None,
) -> None:
    """Make the next epoch of `epoch_iterator` start at `batch`.

    Draws `position` batches from a fresh input iterator and discards them,
    then yields steps from `batch` on; later epochs are untouched. Calls
    `before_new_iterator()` first (to bring the input to the same
    iteration as the backed-up run). Checks that Keras yielded exactly the
    steps it skipped and raises `IncompatibleKerasError` otherwise.
    """
    if batch == 0 and position == 0 and before_new_iterator is None:
        return
    original = epoch_iterator._enumerate_iterator

    def resumed() -> Iterator[tuple[int, int, Any]]:
        # This epoch only, even if fit never exhausts this generator.
        epoch_iterator.__dict__.pop("_enumerate_iterator", None)
        if before_new_iterator is not None:
            before_new_iterator()
        drawn = 0
        expected_step = 0
        landed = False
        for begin, end, iterator in original():
            if begin != expected_step:
                raise incompatible(
                    f"the epoch's steps are not consecutive from 0: got step {begin} where "
                    f"step {expected_step} was expected"
                )
            expected_step = end + 1
            if not landed:
                if begin == 0 and position > batch:
                    # The iterator is kept across epochs: it is `position - batch`
                    # batches ahead of this epoch's start.
                    _discard(iterator, position - batch, batch)
                    drawn += position - batch
                    epoch_iterator._steps_seen += position - batch
                if begin < batch:
                    _discard(iterator, end - begin + 1, batch)
                    drawn += end - begin + 1
                    continue
                _check_landing(epoch_iterator, begin, end, batch, position, drawn)
                landed = True
            yield begin, end, iterator
        if not landed and batch:
            raise errors.UnsupportedConfigurationError(
                f"The input ended before batch {batch} of the resumed epoch. Resume with "
                "the same input (same data, batch size and steps_per_epoch) that the "
                "backed-up run used."
            )

    epoch_iterator._enumerate_iterator = resumed


def _check_landing(
    epoch_iterator: Any, begin: int, end: int, batch: int, position: int, drawn: int
) -> None:
    """The first step trained after a skip must be the saved batch, the input at `position`."""
    if begin != batch:
        raise errors.UnsupportedConfigurationError(
            f"The backup resumes at batch {batch} of its epoch, but this fit's steps run "
            f"{begin - (end - begin + 1)}..{end} around it: batch {batch} is not the "
            "start of a step. Resume with the steps_per_execution that wrote the backup."
        )
    if drawn != position:
        raise incompatible(f"ft skipped {drawn} batches where it meant to skip {position}")
    seen = epoch_iterator._steps_seen
    if seen != position + end - begin + 1:
        raise incompatible(
            f"`EpochIterator._steps_seen` is {seen} at the first resumed step {begin}, "
            f"expected {position + end - begin + 1} ({position} skipped and "
            f"{end - begin + 1} in this step)"
        )


def check_resumed_batch(batch: int, expected: int) -> None:
    """Raise unless the resumed epoch's first batch, as `fit` reports it, is `expected`.

    Call from `on_train_batch_begin`: catches a `fit` that no longer draws
    its batches through the hook `start_next_epoch_at` replaced.
    """
    if batch != expected:
        raise incompatible(
            f"the resumed epoch began at batch {batch}, but ft had made it skip to batch "
            f"{expected}: `fit` no longer iterates through `EpochIterator._enumerate_iterator`"
        )


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
