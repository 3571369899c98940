"""`save_before_preemption`: a SIGTERM on any worker makes every worker save at one agreed step.

Runs on every process. The SIGTERM handler only sets a flag. At its next
step boundary the worker that got the signal proposes a stop step (its own
step plus a margin, so that no worker has passed it yet) by writing it,
first writer wins, into the engine's key-value store; a background thread on
every worker waits for that key, so a step costs one Python attribute read.
At the agreed step every worker saves, leaves `fit`, and the process exits
with `PREEMPTED_EXIT_CODE`, which `python -m ft.launch` treats as "restart me".
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

logger = logging.getLogger("ft")

PREEMPTED_EXIT_CODE = 42
# Workers in synchronous training are at most one step apart, so a stop step
# this far ahead of the proposer's is still ahead of everyone.
MARGIN_STEPS = 4


class PreemptionWatch:
    """Turns a SIGTERM into a stop step every process agrees on.

    Args:
        coordinator: The run's `ft.strategies.Coordinator`.
        name: Key under which the stop step is agreed; unique per `fit`.
    """

    def __init__(self, coordinator: Any, name: str) -> None:
        self._coordinator = coordinator
        self._name = name
        self._signalled = threading.Event()
        self._stopping = threading.Event()
        self._agreed: int | None = None
        self._proposed = False
        self._previous: Any = None
        self._thread: threading.Thread | None = None

    @property
    def signalled(self) -> bool:
        return self._signalled.is_set()

    def install(self) -> None:
        """Catch SIGTERM and start listening for the agreed step. Call on all processes."""
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self._coordinator.num_processes > 1:
            self._thread = threading.Thread(target=self._listen, daemon=True, name="ft-preemption")
            self._thread.start()

    def uninstall(self) -> None:
        """Restore the previous SIGTERM handler and stop listening."""
        self._stopping.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._thread is not None:
            self._thread.join(timeout=5)

    def stop_step(self, step: int) -> int | None:
        """The step to save at and stop, once known. Call at every step boundary."""
        if self._signalled.is_set() and not self._proposed:
            self._proposed = True
            if self._coordinator.num_processes == 1:
                self._agreed = step
            else:
                proposal = step + MARGIN_STEPS
                logger.info("SIGTERM received: proposing to save and stop at step %d", proposal)
                self._coordinator.publish(self._name, str(proposal))
        return self._agreed

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signalled.set()
        marker = os.environ.get("FT_SIGTERM_FILE")  # set by python -m ft.launch
        if marker:  # tells the launcher which worker was preempted
            with contextlib.suppress(OSError):
                open(marker, "w").close()

    def _listen(self) -> None:
        while not self._stopping.is_set():
            value = self._coordinator.wait_value(self._name, 1.0)
            if value is not None:
                self._agreed = int(value)
                return
