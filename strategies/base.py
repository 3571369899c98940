"""The small protocol every engine adapter implements, and the one-process default.

ft's callback talks to the other processes only through a `Coordinator`:
who am I, how many are we, who writes, wait for everyone, share a small value.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import itertools
import os
import time
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from ft import errors

DEFAULT_TIMEOUT = 300.0

# Fits begun in this process. Every process of a run calls `fit` the same number
# of times, so the count names one fit on all of them: the keys and barriers of
# a fit carry it and never meet those of an earlier fit (a retry after an
# error, a second training phase) in the engine's coordination service.
_fits_begun = itertools.count(1)


@runtime_checkable
class Coordinator(Protocol):
    """Cross-process services ft needs from a distributed engine."""

    @property
    def process_index(self) -> int:
        """This process's index, 0 for the chief."""
        ...

    @property
    def num_processes(self) -> int:
        """How many training processes take part."""
        ...

    @property
    def is_chief(self) -> bool:
        """True on the one process that writes into `backup_dir`."""
        ...

    def begin(self, timeout: float) -> int:
        """Agree with every process on the generation of the `fit` that starts.

        Call on all processes, once per `fit`, before any other method: names
        of later barriers and keys carry the generation, so they are unique per
        `fit`. Returns it (1 for the first `fit` of this process).

        Raises:
            BarrierTimeoutError: when a process did not begin the same `fit`
                within `timeout` s.
        """
        ...

    def barrier(self, name: str, timeout: float) -> None:
        """Wait until every process reached barrier `name`. Call on all processes.

        Raises:
            BarrierTimeoutError: when not every process arrived within `timeout` s.
            PeerLostError: when the engine reports a peer as dead.
        """
        ...

    def broadcast(self, name: str, value: str | None, timeout: float) -> str:
        """The chief's `value` (a short string), on every process. Call on all processes."""
        ...

    def decide(self, name: str, value: str | None, timeout: float) -> str:
        """`broadcast` for a decision taken again and again (once per training step).

        Call on all processes, with a training step (whose collective joins
        every process) between two calls: the chief then deletes the value
        of the call before the previous one, which every process has read,
        so the engine's store does not grow with the steps.
        """
        ...

    def gather(self, name: str, value: str, timeout: float) -> list[str] | None:
        """Every process's `value` (a short string), in process order, on the chief;
        None on the others. Call on all processes.

        Raises:
            BarrierTimeoutError: on the chief, when a process's value did not
                arrive within `timeout` s.
        """
        ...

    def publish(self, name: str, value: str) -> None:
        """Store `value` under `name` unless a value is already there. Any process."""
        ...

    def wait_value(self, name: str, timeout: float) -> str | None:
        """The value published under `name`, or None if none appears within `timeout` s."""
        ...

    def for_thread(self, name: str) -> Coordinator:
        """The coordinator to call from another thread of this process (`name`: its job).

        Its barriers and keys are counted apart from this one's: calls from two
        threads would interleave in a different order on every process. Call on
        all processes, after `begin`; every process's thread `name` then makes
        the same calls in the same order (the save pipeline's thread does).
        """
        ...


class SingleProcess:
    """The coordinator of a run with one process: every wait returns at once."""

    process_index = 0
    num_processes = 1
    is_chief = True

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def begin(self, timeout: float) -> int:
        self._values.clear()
        return next(_fits_begun)

    def barrier(self, name: str, timeout: float) -> None:
        return None

    def broadcast(self, name: str, value: str | None, timeout: float) -> str:
        if value is None:
            raise ValueError("the chief must broadcast a value")
        return value

    def decide(self, name: str, value: str | None, timeout: float) -> str:
        return self.broadcast(name, value, timeout)

    def gather(self, name: str, value: str, timeout: float) -> list[str] | None:
        return [value]

    def publish(self, name: str, value: str) -> None:
        self._values.setdefault(name, value)

    def wait_value(self, name: str, timeout: float) -> str | None:
        return self._values.get(name)

    def for_thread(self, name: str) -> Coordinator:
        return self


class KeyValueCoordinator:
    """A `Coordinator` built on an engine's coordination service.

    Subclasses provide three primitives (wait at a named barrier, set a key
    once, wait for a key); the protocol's methods are written once here.
    Barrier and key names are unique per call, in the same order on every
    process, and start with `ft/<generation>/`, unique per `fit`.
    """

    def __init__(self, process_index: int, num_processes: int) -> None:
        self._index = process_index
        self._count = num_processes
        self._ids = itertools.count()
        self._generation = 0
        self._thread = ""  # "" for the thread that began the fit, else `for_thread`'s name
        self._threads: dict[str, KeyValueCoordinator] = {}
        # The keys of the chief's last two `decide` calls, per name.
        self._decided: dict[str, collections.deque[str]] = {}

    @property
    def process_index(self) -> int:
        return self._index

    @property
    def num_processes(self) -> int:
        return self._count

    @property
    def is_chief(self) -> bool:
        return self._index == 0

    def _wait_at_barrier(self, barrier_id: str, timeout_ms: int) -> None:
        raise NotImplementedError

    def _set(self, key: str, value: str) -> None:
        """Store `value`; raise if `key` is already set."""
        raise NotImplementedError

    def _get(self, key: str, timeout_ms: int) -> str:
        """The value of `key`, waiting for it; raise on timeout."""
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        """Remove `key`; nothing if it is not there."""
        raise NotImplementedError

    # The fits this process began; a class attribute so that tests running
    # "processes" as threads can give each its own.
    _fits_begun = _fits_begun

    def begin(self, timeout: float) -> int:
        generation = next(self._fits_begun)
        self._generation, self._ids = generation, itertools.count()
        self._decided, self._threads = {}, {}
        deadline = time.monotonic() + timeout
        with translate_engine_errors(f"beginning fit number {generation}", timeout):
            self._set(self._key(f"begin/{self._index}"), str(os.getpid()))
            for index in range(self._count):
                if index == self._index:
                    continue
                remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
                try:
                    self._get(self._key(f"begin/{index}"), remaining_ms)
                except Exception as e:
                    if "DEADLINE" not in f"{type(e).__name__} {e}".upper():
                        raise
                    raise errors.BarrierTimeoutError(
                        f"Worker {index} did not begin fit number {generation} of this "
                        f"process within {timeout:g} s (worker {self._index} did). Every "
                        "process must call fit the same number of times, all of them after "
                        f"an error too. Worker {index} is dead, hung, still inside an "
                        "earlier fit (a collective that waits for a worker that left fit "
                        "with an error ends only at its timeout), or called fit fewer "
                        "times; check its log."
                    ) from e
        return generation

    def _key(self, name: str) -> str:
        return f"ft/{self._generation}/{self._thread}{name}"

    def for_thread(self, name: str) -> Coordinator:
        view = self._threads.get(name)
        if view is None:
            view = copy.copy(self)  # the same client, process and fit
            view._thread, view._ids = f"{name}/", itertools.count()
            view._decided, view._threads = {}, {}
            self._threads[name] = view
        return view

    def barrier(self, name: str, timeout: float) -> None:
        barrier_id = self._key(f"{name}/{next(self._ids)}")
        with translate_engine_errors(f"barrier {name!r}", timeout):
            self._wait_at_barrier(barrier_id, int(timeout * 1000))

    def broadcast(self, name: str, value: str | None, timeout: float) -> str:
        key = self._key(f"{name}/{next(self._ids)}")
        with translate_engine_errors(f"broadcast {name!r}", timeout):
            if self.is_chief:
                if value is None:
                    raise ValueError("the chief must broadcast a value")
                self._set(key, value)
                return value
            return self._get(key, int(timeout * 1000))

    def decide(self, name: str, value: str | None, timeout: float) -> str:
        key = self._key(f"{name}/{next(self._ids)}")
        with translate_engine_errors(f"decision {name!r}", timeout):
            if not self.is_chief:
                return self._get(key, int(timeout * 1000))
            if value is None:
                raise ValueError("the chief must broadcast a value")
            self._set(key, value)
            earlier = self._decided.setdefault(name, collections.deque())
            earlier.append(key)
            if len(earlier) > 2:
                # Read by every process: a training step ran since it was set.
                self._delete(earlier.popleft())
            return value

    def gather(self, name: str, value: str, timeout: float) -> list[str] | None:
        base = self._key(f"{name}/{next(self._ids)}")
        with translate_engine_errors(f"gather {name!r}", timeout):
            self._set(f"{base}/{self._index}", value)
            if not self.is_chief:
                return None
            deadline = time.monotonic() + timeout
            values = []
            for index in range(self._count):
                remaining_ms = max(int((deadline - time.monotonic()) * 1000), 1)
                values.append(self._get(f"{base}/{index}", remaining_ms))
            return values

    def publish(self, name: str, value: str) -> None:
        try:
            self._set(self._key(name), value)
        except Exception as e:  # the first writer wins
            if "ALREADY" not in str(e).upper().replace(" ", "_") and "AlreadyExists" not in (
                type(e).__name__
            ):
                raise

    def wait_value(self, name: str, timeout: float) -> str | None:
        try:
            return self._get(self._key(name), int(timeout * 1000))
        except Exception as e:
            if "DEADLINE" in f"{type(e).__name__} {e}".upper():
                return None
            raise


class DefaultScope:
    """What `auto()` returns where no distribution is needed: `.scope()` does nothing."""

    def scope(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


@contextlib.contextmanager
def translate_engine_errors(what: str, timeout: float | None) -> Iterator[None]:
    """Turn an engine's deadline and peer-failure errors into ft errors.

    `timeout` is the bound the wait had, or None where the engine set it.
    """
    try:
        yield
    except errors.FTError:
        raise
    except Exception as e:
        text = f"{type(e).__name__}: {e}"
        if "DeadlineExceeded" in text or "timed out" in text.lower():
            raise errors.BarrierTimeoutError(
                f"{what} did not complete "
                f"{'in time' if timeout is None else f'within {timeout:g} s'}: not every "
                "worker arrived "
                f"({text.splitlines()[0][:300]}). A worker is dead, hung or much slower than "
                "the others; check its log. If it is only slow, raise "
                + (
                    "`collective_timeout` (ft.strategies.auto)."
                    if timeout is None
                    else "the callback's `timeout`."
                )
            ) from e
        lowered = text.lower()
        if any(k in lowered for k in ("unavailable", "aborted", "unhealthy", "connection reset")):
            raise errors.PeerLostError(
                f"{what} failed because {missing_worker(text)} was lost: it died or stopped "
                f"answering ({text.splitlines()[0][:300]}). Restart the whole group "
                "(python -m ft.launch does); training resumes from the last committed backup."
            ) from e
        raise


def missing_worker(text: str) -> str:
    """Name the worker an engine's error message blames, as precisely as it says."""
    import re

    task = re.search(r"/job:(\w+)/(?:replica:\d+/)?task:(\d+)", text)
    if task:
        return f"worker {task.group(2)} ({task.group(0)})"
    task = re.search(r"\btask[ _:]?(\d+)", text)
    return f"worker {task.group(1)}" if task else "a peer worker"
