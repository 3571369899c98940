"""Removing a finished run's backups without making `fit` wait for the storage.

Primary process only. Deleting a backup of a few GB takes a filesystem most of
a second (freeing its extents and cached pages: 0.8 s for 3.8 GB on the GPU
machine) and an object store one request per object. At the end of a `fit`
each store first makes what it deletes stop counting as a backup, on the
training thread (a POSIX store renames `backup_dir` aside, `posix_removal`; a
bucket store deletes every commit marker), then hands the removal of the
bytes to `start`: one thread per removal, under a key (the path or URL it
removes), none a daemon, so the interpreter waits for them at exit. A process
killed before one ends leaves only what no longer counts as a backup, and the
next run in the same `backup_dir` removes it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ft.log import get_logger

logger = get_logger()

_lock = threading.Lock()
_running: dict[str, threading.Thread] = {}  # key -> the thread removing it


def start(key: str, remove: Callable[[], None]) -> None:
    """Run `remove` on a thread of its own, registered under `key` until it ends.

    An error is logged, not raised: what it left no longer counts as a
    backup, and the next run where it was removes it.
    """

    def run() -> None:
        began = time.perf_counter()
        try:
            remove()
            logger.debug("removed the backups in %s in %.3f s", key, time.perf_counter() - began)
        except Exception as e:  # reported, and harmless (see above)
            logger.warning(
                "Could not remove everything of the finished run's backups in %s "
                "(%s: %s). None of it counts as a backup any more; a run that next "
                "starts there removes it, or delete it yourself.",
                key,
                type(e).__name__,
                e,
            )
        finally:
            with _lock:
                if _running.get(key) is thread:
                    del _running[key]

    thread = threading.Thread(target=run, name="ft-remove-backups", daemon=False)
    with _lock:
        _running[key] = thread
    thread.start()


def running() -> set[str]:
    """The keys of the removals still running in this process."""
    with _lock:
        return set(_running)


def wait_for(key: str, timeout: float | None = None) -> bool:
    """Wait at most `timeout` s for the removal under `key`; True once none runs there."""
    with _lock:
        thread = _running.get(key)
    if thread is None:
        return True
    thread.join(timeout)
    return not thread.is_alive()


def wait(timeout: float | None = None) -> bool:
    """Wait at most `timeout` s for every removal of this process; True once none runs."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            left = list(_running)
        if not left:
            return True
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not wait_for(left[0], remaining):
            return False
