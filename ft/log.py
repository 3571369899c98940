"""ft's logger: lines carry `[process=N]` so interleaved worker output stays readable.

ft says what it does at INFO (one line when `fit` begins, one when it ends)
and logs each committed backup at DEBUG. Python's logging shows only WARNING
and above by default, and libraries ft uses (absl, through Orbax and JAX)
configure the root logger on their own, so ft's logger is set to INFO and
prints through a stderr handler of its own, unless the application gave the
`ft` logger a handler before ft was imported. To silence ft's INFO lines:

    logging.getLogger("ft").setLevel(logging.WARNING)

or set `FT_LOG_LEVEL=WARNING` in the environment (any level name works:
`DEBUG` also shows every commit).
"""

from __future__ import annotations

import logging
import os

_FORMAT = "ft [process=%(ft_process)s] %(levelname)s: %(message)s"
_engine_index: int | None = None
_said: set[str] = set()


def set_process_index(index: int) -> None:
    """Record this process's index as the engine reports it (when no launcher set one)."""
    global _engine_index
    _engine_index = int(index)


def process_index() -> str:
    """N in `[process=N]`: the launcher's `FT_PROCESS_INDEX`, else the engine's, else 0."""
    index = os.environ.get("FT_PROCESS_INDEX")
    if index is not None:
        return index
    return str(_engine_index) if _engine_index is not None else "0"


class _ProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ft_process = process_index()
        return True


def get_logger() -> logging.Logger:
    """The `ft` logger, at INFO (or `FT_LOG_LEVEL`), printing to stderr by default."""
    logger = logging.getLogger("ft")
    if not getattr(logger, "_ft_configured", False):
        logger._ft_configured = True  # type: ignore[attr-defined]
        logger.addFilter(_ProcessFilter())
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(_FORMAT))
            logger.addHandler(handler)
            logger.propagate = False
        level = logging.getLevelName(os.environ.get("FT_LOG_LEVEL", "").strip().upper())
        if isinstance(level, int):
            logger.setLevel(level)
        elif logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


def say_once(key: str, level: int, message: str, *args: object) -> None:
    """Log `message` (with `args`) the first time `key` is said in this process; any thread."""
    if key not in _said:
        _said.add(key)
        get_logger().log(level, message, *args)
