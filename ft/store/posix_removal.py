"""Deleting backups without making `fit` wait for the filesystem.

Primary process only. Deleting a backup of a few GB takes the kernel most of a
second (freeing its extents and cached pages: 0.8 s for 3.8 GB on the GPU
machine, about what Keras's own callback takes at its `fit`'s end). ft
renames what it deletes aside at once, so that nothing of it is left under
`backup_dir` when `fit` returns, and removes the bytes on a thread of its
own. The interpreter waits for that thread at exit (it is not a daemon); a
process killed before it ends leaves trash that the next run in the same
`backup_dir` removes (`sweep_siblings`).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterable

from ft.log import get_logger

logger = get_logger()

_lock = threading.Lock()
_running: list[threading.Thread] = []
_removing: set[str] = set()  # paths this process's threads are removing


def sibling_trash_prefix(directory: str, trash_prefix: str) -> str:
    """The name prefix of `directory` moved aside, as a sibling of it."""
    return f"{trash_prefix}{os.path.basename(os.path.normpath(directory))}-"


def move_aside(directory: str, trash_prefix: str) -> str | None:
    """Rename `directory` to a trash sibling; its new path, or None where it cannot be
    (a mount point, a symbolic link, no write permission on its parent)."""
    directory = os.path.normpath(directory)
    if os.path.islink(directory) or os.path.ismount(directory):
        return None  # renaming would move the link or fail, not the backups
    parent = os.path.dirname(os.path.abspath(directory))
    aside = os.path.join(
        parent, f"{sibling_trash_prefix(directory, trash_prefix)}{uuid.uuid4().hex[:12]}"
    )
    try:
        os.rename(directory, aside)
    except OSError:
        return None
    return aside


def sweep_siblings(directory: str, trash_prefix: str) -> None:
    """Remove what an earlier run's `move_aside` of `directory` left (it was killed),
    but not what a removal of this process is still removing."""
    parent = os.path.dirname(os.path.abspath(os.path.normpath(directory)))
    prefix = sibling_trash_prefix(directory, trash_prefix)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    with _lock:
        removing = set(_removing)
    pattern = re.compile(re.escape(prefix) + r"[0-9a-f]{12}")
    for name in names:
        path = os.path.join(parent, name)
        if pattern.fullmatch(name) and path not in removing:
            shutil.rmtree(path, ignore_errors=True)


def remove_in_background(paths: Iterable[str]) -> None:
    """Remove `paths` (files or trees) on a thread; the interpreter waits for it at exit."""
    paths = [os.path.abspath(p) for p in paths]
    if not paths:
        return

    def remove() -> None:
        start = time.perf_counter()
        try:
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
            seconds = time.perf_counter() - start
            logger.debug("removed %d deleted backup paths in %.3f s", len(paths), seconds)
        finally:
            with _lock:
                _running.remove(thread)
                _removing.difference_update(paths)

    thread = threading.Thread(target=remove, name="ft-delete-backups", daemon=False)
    with _lock:
        _running.append(thread)
        _removing.update(paths)
    thread.start()


def wait(timeout: float | None = None) -> bool:
    """Wait for every removal started in this process; True when none is left."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _lock:
            left = list(_running)
        if not left:
            return True
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        left[0].join(remaining)
        if deadline is not None and time.monotonic() >= deadline:
            with _lock:
                return not _running
