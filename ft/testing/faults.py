"""Fault callbacks: kill, preempt, freeze or crash one worker before a chosen global step.

Runs inside the workers of a job under test. Each fault fires once per job:
the worker that fires it first creates a marker file in the job's directory
(`FT_TESTING_DIR`, set by `ft.testing.run`), so the restarted worker, which
passes the same step again after restoring an earlier backup, trains on.
"""

from __future__ import annotations

import json
import numbers
import os
import signal
import subprocess
import sys
from typing import Any

import keras

from ft import errors
from ft.testing.runner import ENV_DIR

# The frozen process cannot wake itself: a helper child in its process group
# sends SIGCONT, unless the worker died meanwhile (its parent is then another).
_THAW = (
    "import os, signal, sys, time\n"
    "pid, seconds = int(sys.argv[1]), float(sys.argv[2])\n"
    "time.sleep(seconds)\n"
    "if os.getppid() == pid:\n"
    "    os.kill(pid, signal.SIGCONT)\n"
)


class WorkerFault(keras.callbacks.Callback):
    """Base class of the fault callbacks: fires `_fire()` once per job.

    Args:
        worker: Integer, the worker to hurt, as numbered by `python -m ft.launch`
            (`FT_PROCESS_INDEX`; worker 0 is the chief).
        step: Integer, the global step before which the fault fires: when the
            worker has trained `step` batches in all (`optimizer.iterations`,
            counted across epochs and restored from backups), before it trains
            the next one.
        marker_dir: String or path-like, where the once-per-job marker is
            written. Defaults to `$FT_TESTING_DIR`, which `ft.testing.run` sets.
    """

    kind = "fault"

    def __init__(
        self, worker: int, step: int, *, marker_dir: str | os.PathLike[str] | None = None
    ) -> None:
        super().__init__()
        for name, value in (("worker", worker), ("step", step)):
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
                raise ValueError(
                    f"Invalid value for argument `{name}`. Received: {name}={value!r}. "
                    "Expected an integer >= 0."
                )
        directory = os.fspath(marker_dir) if marker_dir is not None else os.environ.get(ENV_DIR)
        if not directory:
            raise ValueError(
                f"{type(self).__name__} needs a directory for its once-per-job marker. "
                f"Received: marker_dir=None and no ${ENV_DIR} in the environment. Run the "
                f"script through `ft.testing.run` (it sets ${ENV_DIR}) or pass `marker_dir`."
            )
        self.worker = int(worker)
        self.step = int(step)
        self.marker_dir = directory
        self._step: int | None = None
        self._epoch = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._step = None  # read at the first batch, after a backup was restored

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._step is None:
            self._step = _iterations(self.model)
        if self._step != self.step or _worker_index() != self.worker or not self._claim():
            return
        print(
            f"ft.testing: {self.describe()} (epoch {self._epoch}, batch {batch})",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        self._fire()

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if self._step is not None:
            self._step += 1

    def describe(self) -> str:
        """What this fault does, for the worker's output."""
        return f"{type(self).__name__} on worker {self.worker} before step {self.step}"

    def _claim(self) -> bool:
        """True the first time any process of the job gets here."""
        os.makedirs(self.marker_dir, exist_ok=True)
        path = os.path.join(self.marker_dir, f"fault-{self.kind}-w{self.worker}-s{self.step}")
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"fault": self.kind, "pid": os.getpid(), "epoch": self._epoch}, f)
        return True

    def _fire(self) -> None:
        raise NotImplementedError


class KillWorker(WorkerFault):
    """SIGKILLs worker `worker` before global step `step`, once per job.

    The process dies at once, as on a lost node; `python -m ft.launch`
    restarts the group if `max_restarts` allows.

    Example:

    >>> model.fit(x, y, callbacks=[ft.BackupAndRestore(d, save_freq=5),
    ...                            ft.testing.KillWorker(worker=1, step=11)])

    Args:
        worker: Integer, the worker to kill (`FT_PROCESS_INDEX`).
        step: Integer, the global step before which it dies (see `WorkerFault`).
        marker_dir: Where the once-per-job marker goes. Defaults to `$FT_TESTING_DIR`.
    """

    kind = "kill"

    def _fire(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


class PreemptWorker(WorkerFault):
    """Sends SIGTERM to worker `worker` before global step `step`, once per job.

    As a cluster does before taking a machine away. With
    `ft.BackupAndRestore(save_before_preemption=True)` every worker saves the
    same step and exits 42, and the launcher restarts the group without
    using a restart; without it the worker dies of the signal (exit 143).

    Args:
        worker: Integer, the worker to preempt (`FT_PROCESS_INDEX`).
        step: Integer, the global step before which the signal arrives.
        marker_dir: Where the once-per-job marker goes. Defaults to `$FT_TESTING_DIR`.
    """

    kind = "preempt"

    def _fire(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


class FreezeWorker(WorkerFault):
    """Stops worker `worker` (SIGSTOP) before global step `step` for `seconds`, once per job.

    As a machine that stops answering without dying. A helper process in the
    worker's process group sends SIGCONT after `seconds`; a freeze longer than
    the heartbeat (`ft.strategies.auto(heartbeat_timeout=...)`) makes the other
    workers fail, and the launcher restarts the group (its SIGTERM comes with a
    SIGCONT). A shorter one is a hiccup that training must survive unharmed.

    Args:
        worker: Integer, the worker to freeze (`FT_PROCESS_INDEX`).
        step: Integer, the global step before which it freezes.
        seconds: Float, how long it stays stopped. Defaults to 60.
        marker_dir: Where the once-per-job marker goes. Defaults to `$FT_TESTING_DIR`.
    """

    kind = "freeze"

    def __init__(
        self,
        worker: int,
        step: int,
        seconds: float = 60.0,
        *,
        marker_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(worker, step, marker_dir=marker_dir)
        if not isinstance(seconds, numbers.Real) or not 0 < seconds < float("inf"):
            raise ValueError(
                f"Invalid value for argument `seconds`. Received: seconds={seconds!r}. "
                "Expected a positive, finite number of seconds."
            )
        self.seconds: float = float(seconds)
        self._thaw: subprocess.Popen[bytes] | None = None

    def describe(self) -> str:
        return f"{super().describe()} for {self.seconds:g} s"

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self._thaw is not None and self._thaw.poll() is not None:
            self._thaw = None  # reaped: it sent SIGCONT and exited

    def _fire(self) -> None:
        self._thaw = subprocess.Popen(
            [sys.executable, "-c", _THAW, str(os.getpid()), str(self.seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.kill(os.getpid(), signal.SIGSTOP)


class RaiseInWorker(WorkerFault):
    """Raises `ft.errors.InjectedFaultError` in worker `worker` before global step `step`.

    As a bug or a bad batch: the exception leaves `fit` like any other, and
    the worker exits with an error unless the script catches it. Once per job.

    Args:
        worker: Integer, the worker to crash (`FT_PROCESS_INDEX`).
        step: Integer, the global step before which it raises.
        marker_dir: Where the once-per-job marker goes. Defaults to `$FT_TESTING_DIR`.
    """

    kind = "raise"

    def _fire(self) -> None:
        raise errors.InjectedFaultError(
            f"ft.testing.RaiseInWorker: injected failure on worker {self.worker} "
            f"before step {self.step}, as the test asked"
        )


def _worker_index() -> int:
    return int(os.environ.get("FT_PROCESS_INDEX", "0"))


def _iterations(model: keras.Model) -> int:
    """The optimizer's step count on this process (a replica's copy, no collective)."""
    value = model.optimizer.iterations.value
    if hasattr(value, "addressable_data"):  # a JAX array, maybe spanning processes
        value = value.addressable_data(0)
    return int(keras.ops.convert_to_numpy(value))
