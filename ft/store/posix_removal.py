"""Moving a POSIX `backup_dir` aside so that its bytes can be removed later.

Primary process only. At the end of a `fit` the POSIX store renames what it
deletes aside at once, so that nothing of it is left under `backup_dir` when
`fit` returns, and removes the bytes on a thread of its own
(`background_removal`). A process killed before that thread ends leaves
trash that the next run in the same `backup_dir` removes (`sweep_siblings`).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid

from ft.store import background_removal


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
    removing = background_removal.running()
    pattern = re.compile(re.escape(prefix) + r"[0-9a-f]{12}")
    for name in names:
        path = os.path.join(parent, name)
        if pattern.fullmatch(name) and path not in removing:
            shutil.rmtree(path, ignore_errors=True)


def remove_in_background(path: str) -> None:
    """Remove `path` (a tree moved aside) on a thread; the interpreter waits for it at exit."""
    path = os.path.abspath(path)
    background_removal.start(path, lambda: shutil.rmtree(path, ignore_errors=True))
