"""Checks of `ft.BackupAndRestore`'s arguments, with Keras-style messages.

Each function returns the value it checked (converted where the callback
stores it converted) and raises `ValueError` naming the argument, the value
received and what was expected.
"""

from __future__ import annotations

import numbers
import os
from typing import Any, cast


def checked_backup_dir(backup_dir: Any) -> str:
    """`backup_dir` as a string: a non-empty `str` or `os.PathLike`."""
    if not isinstance(backup_dir, (str, os.PathLike)) or not os.fspath(backup_dir):
        raise ValueError(
            "Invalid value for argument `backup_dir`. "
            f"Received: backup_dir={backup_dir!r}. Expected a non-empty path "
            "(a string or os.PathLike) of a directory for the backups."
        )
    return os.fspath(backup_dir)


def checked_save_freq(save_freq: Any, save_before_preemption: bool) -> Any:
    """`save_freq` unchanged: `"epoch"`, a positive integer, or `False` with preemption saves."""
    if save_freq is False:
        if save_before_preemption:
            return save_freq
        raise ValueError(
            "Invalid value for argument `save_freq`. Received: save_freq=False "
            "with save_before_preemption=False, which would never save. Expected "
            '"epoch" or a positive integer, or pass save_before_preemption=True to '
            "save only when the job is preempted."
        )
    valid_int = (
        isinstance(save_freq, numbers.Integral)
        and not isinstance(save_freq, bool)
        and int(save_freq) > 0
    )
    if not (valid_int or (isinstance(save_freq, str) and save_freq == "epoch")):
        raise ValueError(
            "Invalid value for argument `save_freq`. "
            f"Received: save_freq={save_freq!r}. "
            'Expected "epoch" (save at the end of each epoch), a positive integer '
            "(save every that many batches), or False together with "
            "save_before_preemption=True."
        )
    return save_freq


def checked_max_to_keep(max_to_keep: Any) -> int:
    """`max_to_keep` as an `int`: a positive integer (not a bool)."""
    if (
        isinstance(max_to_keep, numbers.Integral)
        and not isinstance(max_to_keep, bool)
        and int(max_to_keep) >= 1
    ):
        return int(max_to_keep)
    raise ValueError(
        "Invalid value for argument `max_to_keep`. "
        f"Received: max_to_keep={max_to_keep!r}. Expected a positive integer "
        "(how many committed backups to keep)."
    )


def checked_timeout(timeout: float) -> float:
    """`timeout` as a `float`: a positive, finite number of seconds."""
    if not isinstance(timeout, numbers.Real) or not 0 < timeout < float("inf"):
        raise ValueError(
            f"Invalid value for argument `timeout`. Received: timeout={timeout!r}. "
            "Expected a positive, finite number of seconds."
        )
    return float(timeout)


def checked_async_save(async_save: Any) -> bool | None:
    """`async_save` unchanged: `True`, `False` or `None`."""
    if async_save not in (None, True, False):
        raise ValueError(
            f"Invalid value for argument `async_save`. Received: async_save={async_save!r}. "
            "Expected True, False or None (by state size)."
        )
    return cast("bool | None", async_save)
