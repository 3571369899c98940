"""Commit backups off the training thread, one at a time, never losing an error.

Primary process only (whoever writes). Training waits for a host snapshot of
the state; writing, fsync and commit run here. `submit` first waits for the
previous save, so at most one is in flight and at most one extra copy of the
state is held; an error raised in the background is re-raised by the next
`submit` or `wait` (the callback calls `wait` before `fit` returns).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# backup_dir (realpath) -> its writer, shared by every callback of this process, so
# that a new callback waits for the save a previous one (whose fit raised) left.
_writers: dict[str, BackgroundWriter] = {}
_writers_lock = threading.Lock()


def for_directory(directory: str) -> BackgroundWriter:
    """The one writer of `directory` in this process."""
    import os

    key = os.path.realpath(directory)
    with _writers_lock:
        return _writers.setdefault(key, BackgroundWriter())


class BackgroundWriter:
    """Runs one save at a time on a thread of its own."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, save: Callable[[], Any]) -> None:
        """Wait for the save in flight (raising its error), then start `save`."""
        self.wait()

        def run() -> None:
            try:
                save()
            except BaseException as e:  # surfaced by the next submit() or wait()
                self._error = e

        # Not a daemon: an interpreter that is exiting still finishes the commit.
        self._thread = threading.Thread(target=run, name="ft-backup-writer")
        self._thread.start()

    def wait(self) -> None:
        """Block until no save is in flight; raise the last background error, once."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
