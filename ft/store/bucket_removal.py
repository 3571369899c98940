"""Deleting a bucket's backups without making `fit` wait for the object store.

Primary process only. At the end of a `fit` the store deletes every backup's
commit marker on the training thread (one small request each: from then on
nothing under `backup_dir` counts as committed, and a process killed now
leaves only uncommitted objects, which the next run there removes), then
hands the removal of the objects, and after it the release of the lease, to
a thread of its own (`start`). The lease stays held, and renewed, until the
objects are gone, so no other run writes under `backup_dir` while they are
removed; a new run in the same process waits for the removal before it takes
the lease (`wait_for`). The interpreter waits for the thread at exit (it is
not a daemon).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ft.log import get_logger

logger = get_logger()

_lock = threading.Lock()
_running: dict[str, threading.Thread] = {}  # backup_dir URL -> its removal


def start(url: str, remove: Callable[[], None]) -> None:
    """Run `remove` (the objects, then the lease, of `url`) on a thread of its own.

    An error is logged, not raised: what it left is uncommitted, and the
    next run in `url` removes it.
    """

    def run() -> None:
        began = time.perf_counter()
        try:
            remove()
            logger.debug("deleted the backups in %s in %.3f s", url, time.perf_counter() - began)
        except Exception as e:  # reported, and harmless (see above)
            logger.warning(
                "Could not delete every object of the finished run's backups in %s "
                "(%s: %s). None of them counts as a backup any more; a run that next "
                "starts there removes them, or delete them yourself.",
                url,
                type(e).__name__,
                e,
            )
        finally:
            with _lock:
                if _running.get(url) is thread:
                    del _running[url]

    thread = threading.Thread(target=run, name="ft-delete-bucket-backups", daemon=False)
    with _lock:
        _running[url] = thread
    thread.start()


def wait_for(url: str, timeout: float) -> bool:
    """Wait at most `timeout` s for this process's removal in `url`; True once none runs."""
    with _lock:
        thread = _running.get(url)
    if thread is None:
        return True
    thread.join(timeout)
    return not thread.is_alive()


def wait(timeout: float) -> bool:
    """Wait at most `timeout` s for every removal of this process; True once none runs."""
    deadline = time.monotonic() + timeout
    with _lock:
        urls = list(_running)
    return all(wait_for(url, max(0.0, deadline - time.monotonic())) for url in urls)
