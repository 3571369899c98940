"""Errors raised by ft.

Every error subclasses `FTError` and a built-in exception, so callers can catch
either (`except OSError` keeps working for storage problems, `except ValueError`
for bad input). Messages say what was wrong, what was found, what was expected
and what to do about it.
"""

from __future__ import annotations


class FTError(Exception):
    """Base class of every error raised by ft."""


class CheckpointCorruptedError(FTError, OSError):
    """A backup on disk is truncated, corrupted or unreadable.

    Raised instead of loading it silently. The message names the backup
    directory and the damaged file.
    """


class IncompatibleCheckpointError(FTError, ValueError):
    """A backup was written by a different model or optimizer.

    The message names the backup directory and the first mismatching variable
    (path, shape or dtype).
    """


class BackupDirNotWritableError(FTError, PermissionError):
    """`backup_dir` cannot be created or written; raised at train begin."""


class BackupDirInUseError(FTError, RuntimeError):
    """Another live training run holds the same `backup_dir`."""


class BarrierTimeoutError(FTError, TimeoutError):
    """A cross-process wait did not complete within its timeout."""


class ProcessExitTimeoutError(FTError, TimeoutError):
    """A worker process did not exit within the launcher's bound after SIGKILL."""


class PeerLostError(FTError, RuntimeError):
    """A peer worker died or stopped answering."""


class ChiefFailedError(FTError, RuntimeError):
    """The chief could not prepare or read `backup_dir`; raised on the other workers."""


class WorkerFailedError(FTError, RuntimeError):
    """Another worker failed a step that every worker takes together (loading the
    backup they all restore); raised on the others, with that worker's error."""


class UnsupportedConfigurationError(FTError, ValueError):
    """ft cannot honour the requested combination of arguments or environment."""


class JobTimeoutError(FTError, TimeoutError):
    """An `ft.testing.run` job did not end within its `timeout`.

    Every process of the job was stopped before this was raised; `result`
    holds what the job printed until then.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result


class InjectedFaultError(FTError, RuntimeError):
    """Raised inside a worker by `ft.testing.RaiseInWorker`, on purpose."""


class SaveTimeoutError(FTError, TimeoutError):
    """A backup being written in the background did not commit within `timeout`."""


class IncompatibleKerasError(FTError, RuntimeError):
    """The installed Keras no longer behaves as ft's mid-epoch resume relies on.

    Raised instead of resuming at the wrong batch. The message names the
    installed Keras version and what was found.
    """


class IncompatibleEngineError(FTError, RuntimeError):
    """The installed engine (JAX, TensorFlow) no longer behaves as ft relies on.

    Raised instead of writing a backup that could be wrong. The message names
    the installed version, what was found, and what to do meanwhile.
    """
