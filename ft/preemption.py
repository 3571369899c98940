"""`save_before_preemption`: a SIGTERM on any worker makes every worker save at one agreed step.

Runs on every process. The SIGTERM handler only sets a flag; a listener
thread on every worker does the talking, through the engine's key-value store,
so that a worker whose main thread is blocked in a collective still takes part:

1. The signalled worker holds at its next step boundary (its *bound*), and its
   listener publishes "preempted" (first writer wins); every other listener
   is waiting for that key.
2. Each other listener, once it knows, takes a bound: the last step boundary
   its main thread passed plus `steps_per_execution`. The main thread will not
   pass its bound until the agreement is known (the two share a lock, so the
   bound is taken either before the main thread reaches a boundary or after
   it). Every listener publishes its bound under its own key.
3. Each listener reads every worker's bound; the agreed step is their
   maximum. No worker has passed it (each is held at or before its own
   bound), and every worker can reach it (synchronous workers pass the same
   boundaries).
4. Every worker saves at the first boundary at or after the agreed step,
   leaves `fit`, and the process exits with `PREEMPTED_EXIT_CODE`, which
   `python -m ft.launch` treats as "restart me".

In the normal case a step costs one uncontended lock and two attribute reads.
Any failure of the agreement (a key that does not appear within `timeout`, an
engine error) is raised from the next step boundary, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, NoReturn

from ft import errors

logger = logging.getLogger("ft")

PREEMPTED_EXIT_CODE = 42
# A file ft creates when this worker gets SIGTERM; python -m ft.launch sets it per worker
# to name the preempted worker.
SIGTERM_FILE_ENV = "FT_SIGTERM_FILE"
# How often a listener looks for the local signal while it waits for a peer's.
_POLL_SECONDS = 0.2


def watch(coordinator: Any, timeout: float, steps_per_execution: int, step: int) -> PreemptionWatch:
    """A `PreemptionWatch` for one `fit`, installed at global step `step`. Every process,
    at train begin."""
    preemption = PreemptionWatch(coordinator, "preempt", timeout, stride=steps_per_execution or 1)
    preemption.install(step)
    return preemption


def exit_preempted(step: int) -> NoReturn:
    """Leave the process with `PREEMPTED_EXIT_CODE` once `fit` saved at `step` and ended."""
    logger.info(
        "preempted: saved at step %d; exiting with code %d (restart me)", step, PREEMPTED_EXIT_CODE
    )
    sys.exit(PREEMPTED_EXIT_CODE)


class PreemptionWatch:
    """Turns a SIGTERM into a step every process saves at.

    Args:
        coordinator: The run's `ft.strategies.Coordinator` (its names are
            already unique to this `fit`).
        name: Prefix of the keys of the agreement.
        timeout: Seconds to wait for every worker's bound.
        stride: Most steps between two batch boundaries (`steps_per_execution`).
    """

    def __init__(self, coordinator: Any, name: str, timeout: float, stride: int = 1) -> None:
        self._coordinator = coordinator
        self._name = name
        self._timeout = timeout
        self._stride = max(int(stride), 1)
        self._signalled = threading.Event()
        self._stopping = threading.Event()
        self._known = threading.Event()  # the agreement is known, or has failed
        self._lock = threading.Lock()
        self._passed = 0  # the last step boundary the main thread passed
        self._bound: int | None = None  # the main thread waits here for the agreement
        self._agreed: int | None = None
        self._error: BaseException | None = None
        self._previous: Any = None
        self._thread: threading.Thread | None = None

    @property
    def signalled(self) -> bool:
        return self._signalled.is_set()

    def install(self, step: int = 0) -> None:
        """Catch SIGTERM and start the listener. Call on all processes, at train begin."""
        self._passed = step
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        if self._coordinator.num_processes > 1:
            self._thread = threading.Thread(target=self._listen, daemon=True, name="ft-preemption")
            self._thread.start()

    def uninstall(self) -> None:
        """Restore the previous SIGTERM handler and stop the listener."""
        self._stopping.set()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._thread is not None:
            self._thread.join(timeout=self._timeout)
            self._thread = None
            # This worker passes no boundary any more: a peer still agreeing on a
            # step learns that it cannot save here (first writer wins).
            try:
                index = self._coordinator.process_index
                final = str(self._passed + self._stride)
                self._coordinator.publish(f"{self._name}/bound/{index}", final)
            except Exception as e:  # the cluster may be gone already: nothing waits
                logger.debug("could not publish the final step: %r", e)

    def stop_step(self, step: int) -> int | None:
        """The step to save at and stop, once agreed. Call at every step boundary.

        Blocks only after a preemption, at this worker's bound, until every
        worker's bound is known.

        Raises:
            BarrierTimeoutError: a worker's bound did not arrive within `timeout`.
            PeerLostError: the engine lost a worker during the agreement.
        """
        if self._agreed is not None:
            return self._agreed
        if self._coordinator.num_processes == 1:
            if self._signalled.is_set():
                self._agreed = step
            return self._agreed
        with self._lock:
            self._passed = step
            if self._bound is None and self._signalled.is_set():
                self._bound = step  # signalled here: hold at this boundary
            bound = self._bound
        if self._error is not None:
            raise self._error
        if bound is None or step < bound:
            return None
        if not self._known.wait(self._timeout):
            raise errors.BarrierTimeoutError(
                f"The preemption agreement did not end within {self._timeout:g} s: this "
                f"worker waits at step {step} for every worker's step. A worker is dead or "
                "hung; check its log."
            )
        if self._error is not None:
            raise self._error
        return self._agreed

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._signalled.set()
        marker = os.environ.get(SIGTERM_FILE_ENV)  # set by python -m ft.launch
        if marker:  # tells the launcher which worker was preempted
            with contextlib.suppress(OSError):
                open(marker, "w").close()

    def _listen(self) -> None:
        from ft.strategies import translate_engine_errors

        try:
            with translate_engine_errors("the preemption agreement", self._timeout):
                if not self._wait_for_preemption():
                    return
                with self._lock:
                    if self._bound is None:
                        self._bound = self._passed + self._stride
                index = self._coordinator.process_index
                self._coordinator.publish(f"{self._name}/bound/{index}", str(self._bound))
                self._agreed = max(
                    self._bound_of(i) for i in range(self._coordinator.num_processes)
                )
            logger.info("preemption: every worker saves at step %d", self._agreed)
        except BaseException as e:
            self._error = e
        finally:
            self._known.set()

    def _wait_for_preemption(self) -> bool:
        """Block until some worker was signalled (True) or the fit ended (False)."""
        while not self._stopping.is_set():
            if self._signalled.is_set():
                logger.info("SIGTERM received: agreeing with every worker on a step to save at")
                index = self._coordinator.process_index
                self._coordinator.publish(self._name, f"worker {index}")
                return True
            if self._coordinator.wait_value(self._name, _POLL_SECONDS) is not None:
                return True
        return False

    def _bound_of(self, index: int) -> int:
        deadline = time.monotonic() + self._timeout
        while not self._stopping.is_set():
            value = self._coordinator.wait_value(
                f"{self._name}/bound/{index}", min(_POLL_SECONDS * 5, self._timeout)
            )
            if value is not None:
                return int(value)
            if time.monotonic() > deadline:
                raise errors.BarrierTimeoutError(
                    f"Worker {index} did not report its step for the preemption agreement "
                    f"within {self._timeout:g} s. It is dead or hung; check its log."
                )
        raise errors.BarrierTimeoutError("fit ended during the preemption agreement")
