"""ft's logger: lines carry `[process=N]` so interleaved worker output stays readable."""

from __future__ import annotations

import logging
import os

_FORMAT = "ft [process=%(ft_process)s] %(levelname)s: %(message)s"


class _ProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ft_process = os.environ.get("FT_PROCESS_INDEX", "0")
        return True


def get_logger() -> logging.Logger:
    """The `ft` logger, with a stderr handler at INFO unless the user configured one."""
    logger = logging.getLogger("ft")
    if not getattr(logger, "_ft_configured", False):
        logger._ft_configured = True  # type: ignore[attr-defined]
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter(_FORMAT))
            handler.addFilter(_ProcessFilter())
            logger.addHandler(handler)
            logger.propagate = False
            if logger.level == logging.NOTSET:
                logger.setLevel(logging.INFO)
    return logger
