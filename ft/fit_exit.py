"""Undo what ft installs for one `fit` however that `fit` ends, not only through `on_train_end`.

Runs on every process. Keras 3 calls `on_train_end` only when `fit` completes;
when it raises (an error in a step, in a callback, in the input, a
KeyboardInterrupt) no callback hears of it. What ft installs for the duration
of a fit (the SIGTERM handler and its listener, the guarded train function)
must not outlive it, so `on_fit_exit` runs a cleanup once, at the first of:

- `on_train_end`, which calls it (a `fit` that completed);
- an exception leaving the callback's own `on_train_begin` (which calls it),
  the running `fit`'s epoch loop or one of its callback hooks: ft wraps
  `EpochIterator.catch_stop_iteration` and the epoch and batch hooks of
  `fit`'s `CallbackList`, on those two instances only;
- the end of that `CallbackList` (a weakref finalizer: any other path, once the
  exception is dropped), or the interpreter's exit;
- the next `on_train_begin` of any ft callback in this process.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from ft.log import get_logger

logger = get_logger()

_HOOKS = ("on_epoch_begin", "on_epoch_end", "on_train_batch_begin", "on_train_batch_end")
_pending: list[FitExit] = []  # cleanups of fits that have not ended yet, in this process
_lock = threading.Lock()


class FitExit:
    """A cleanup that runs once; calling it again does nothing."""

    def __init__(self, cleanup: Callable[[], None]) -> None:
        self._cleanup: Callable[[], None] | None = cleanup
        self.finalizer: weakref.finalize | None = None

    @property
    def done(self) -> bool:
        return self._cleanup is None

    def __call__(self) -> None:
        with _lock:
            cleanup, self._cleanup = self._cleanup, None
            if self in _pending:
                _pending.remove(self)
        if self.finalizer is not None:
            self.finalizer.detach()
            self.finalizer = None
        if cleanup is not None:
            cleanup()


def on_fit_exit(model: Any, cleanup: Callable[[], None]) -> FitExit:
    """Run `cleanup` once when the running `fit` of `model` ends, by any path.

    Call from `on_train_begin`. Runs the cleanups that earlier fits in this
    process left (they raised) first. Returns the `FitExit`; call it from
    `on_train_end`.
    """
    run_pending()
    fit_exit = FitExit(cleanup)
    with _lock:
        _pending.append(fit_exit)
    callbacks, epoch_iterator = _fit_locals(model)
    if epoch_iterator is not None:
        _wrap_context(epoch_iterator, "catch_stop_iteration", fit_exit)
    if callbacks is not None and hasattr(callbacks, "on_train_begin"):
        for name in _HOOKS:
            _wrap_hook(callbacks, name, fit_exit)
        fit_exit.finalizer = weakref.finalize(callbacks, fit_exit)
    return fit_exit


def run_pending() -> None:
    """Run every cleanup left by a `fit` of this process that did not end cleanly."""
    with _lock:
        left = list(_pending)
    for fit_exit in left:
        run_quietly(fit_exit)


def run_quietly(fit_exit: FitExit) -> None:
    """Run a cleanup on an error path: its own error must not hide the one that ends fit."""
    try:
        fit_exit()
    except Exception:
        logger.exception("undoing ft's hooks after fit raised failed")


def _wrap_hook(target: Any, name: str, fit_exit: FitExit) -> None:
    original = getattr(target, name, None)
    if original is None:
        return

    def hook(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except BaseException:
            run_quietly(fit_exit)
            raise

    setattr(target, name, hook)


def _wrap_context(target: Any, name: str, fit_exit: FitExit) -> None:
    original = getattr(target, name, None)
    if original is None:
        return

    @contextlib.contextmanager
    def context(*args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            with original(*args, **kwargs) as value:
                yield value
        except BaseException:
            run_quietly(fit_exit)
            raise

    setattr(target, name, context)


def _fit_locals(model: Any) -> tuple[Any, Any]:
    """The `CallbackList` and `EpochIterator` of the `fit` of `model` on this thread's stack."""
    import keras

    from ft import fit_loop

    return (
        fit_loop.fit_local(model, "callbacks", keras.callbacks.CallbackList),
        fit_loop.find_epoch_iterator(model),
    )
