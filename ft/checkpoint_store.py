"""Kept for code written against ft's earlier layout (benchmarks, tests): see `ft.store`.

`CheckpointStore` is `ft.store.posix.PosixStore`, the store of a POSIX
`backup_dir`; new code opens a store with `ft.store.open_store`.
"""

from __future__ import annotations

from ft.store.base import ARRAYS, DAMAGED_PREFIX, PREFIX, TMP_PREFIX, TRASH_PREFIX
from ft.store.posix import PosixStore as CheckpointStore

__all__ = ["ARRAYS", "DAMAGED_PREFIX", "PREFIX", "TMP_PREFIX", "TRASH_PREFIX", "CheckpointStore"]
