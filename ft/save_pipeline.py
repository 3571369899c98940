"""Write backups off the training thread, one at a time, never losing an error.

Primary process only (whoever writes). The training thread hands a snapshot
and its record to `SavePipeline.submit`; a thread of the pipeline moves the
snapshot to host memory, writes it through the checkpoint store (which
checksums, fsyncs and commits atomically, keeping the previous backup until
the new one is durable) and reports the commit to `SaveStats`.

At most one save is in flight, so at most one extra copy of the state is
held. The callback decides what to do when a save comes due while one is in
flight (`busy`): move it to a later step, or `wait`. Every wait is bounded by
the callback's `timeout` and raises `SaveTimeoutError` naming the save it
waited for. A background error is logged when it happens and raised by the
next `submit`, `wait` or `raise_error`, once.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from ft import errors
from ft.log import get_logger
from ft.report import SaveStats
from ft.snapshot import Snapshot

logger = get_logger()

# backup_dir (realpath) -> its pipeline, shared by every callback of this process,
# so that a new callback waits for a save that a previous one (whose fit raised) left.
_pipelines: dict[str, SavePipeline] = {}
_pipelines_lock = threading.Lock()


def for_directory(directory: str) -> SavePipeline:
    """The one save pipeline of `directory` (a path or a bucket URL) in this process."""
    key = directory if "://" in directory else os.path.realpath(directory)
    with _pipelines_lock:
        return _pipelines.setdefault(key, SavePipeline(key))


class SavePipeline:
    """Runs one save at a time on a thread of its own.

    Args:
        directory: String, the `backup_dir` it writes to (named in errors).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""
        self._state_lock = threading.Lock()
        self._running = False  # a background save has not finished yet
        self._after: list[Callable[[], None]] = []
        #: The last 100 commits: step, seconds to host, seconds to write and commit.
        self.history: collections.deque[dict[str, float]] = collections.deque(maxlen=100)

    def busy(self) -> bool:
        """True while a save is in flight."""
        return self._thread is not None and self._thread.is_alive()

    def run(
        self,
        step: int,
        snapshot: Snapshot,
        write: Callable[[dict[str, Any]], str],
        stats: SaveStats,
        background: bool,
        timeout: float,
    ) -> None:
        """Write `snapshot` (of `step`) with `write(host_arrays)`. Training thread.

        Waits for the save in flight first (bounded by `timeout`, raising its
        error). With `background`, returns at once and the save runs on the
        pipeline's thread; otherwise it runs here.
        """
        self.wait(timeout)
        what = f"the backup of step {step} to {self.directory}"
        if not background:
            self._commit(step, snapshot, write, stats)
            return

        def work() -> None:
            try:
                self._commit(step, snapshot, write, stats)
            except BaseException as e:  # raised by the next run(), wait() or raise_error()
                self._error = e
                logger.error(
                    "writing %s failed in the background: %s: %s (raised at the next "
                    "save or at the end of fit)",
                    what,
                    type(e).__name__,
                    e,
                )
            finally:
                self._finished()

        self._what = what
        with self._state_lock:
            self._running = True
        # Not a daemon: an interpreter that is exiting still finishes the commit.
        self._thread = threading.Thread(target=work, name="ft-save-pipeline")
        self._thread.start()

    def _commit(
        self,
        step: int,
        snapshot: Snapshot,
        write: Callable[[dict[str, Any]], str],
        stats: SaveStats,
    ) -> None:
        start = time.perf_counter()
        arrays = snapshot.host()
        to_host = time.perf_counter()
        write(arrays)
        end = time.perf_counter()
        stats.add_commit(snapshot.nbytes, end - start)
        self.history.append(
            {"step": step, "to_host": to_host - start, "write": end - to_host, "total": end - start}
        )

    def _finished(self) -> None:
        """Run what waited for the save in flight to end. The pipeline's thread."""
        with self._state_lock:
            self._running = False
            after, self._after = self._after, []
        for action in after:
            try:
                action()
            except Exception:
                logger.exception("after the save in flight to %s ended", self.directory)

    def when_idle(self, action: Callable[[], None]) -> None:
        """Run `action` now if no save is in flight, else once it has ended. Any thread.

        The pipeline's thread runs it before it ends, so a later `wait` returns
        only after `action` has run. An error of `action` is logged, not raised,
        when it runs on the pipeline's thread.
        """
        with self._state_lock:
            if self._running:
                self._after.append(action)
                return
        action()

    def wait(self, timeout: float) -> None:
        """Block until no save is in flight, at most `timeout` seconds; raise its error, once.

        Raises:
            SaveTimeoutError: when the save in flight is still running after `timeout`.
        """
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise errors.SaveTimeoutError(
                    f"Waited timeout={timeout:g} s for {self._what} to be written and "
                    "committed; it is still running. The storage may be slow or hung: "
                    "check it, or pass a larger `timeout` to ft.BackupAndRestore. The "
                    "previous committed backup is intact."
                )
            self._thread = None
        self.raise_error()

    def raise_error(self) -> None:
        """Raise the error of a finished background save, once; nothing otherwise."""
        if self._error is not None and not self.busy():
            error, self._error = self._error, None
            raise error

    def take_error(self) -> BaseException | None:
        """The error of a finished background save, handed over once (not raised)."""
        if self.busy():
            return None
        error, self._error = self._error, None
        return error
