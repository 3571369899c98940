"""ft.strategies: TF_CONFIG parsing errors and the one-process defaults."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from typing import Any

import pytest

import ft
from ft import errors
from ft.strategies.base import KeyValueCoordinator


def test_invalid_tf_config_gets_a_clear_error() -> None:
    with pytest.raises(errors.UnsupportedConfigurationError, match="TF_CONFIG is not valid"):
        ft.strategies.cluster_from_tf_config({"TF_CONFIG": "{not json"})


def test_parameter_server_cluster_is_refused() -> None:
    config = {
        "cluster": {"worker": ["a:1", "b:1"], "ps": ["p:1"]},
        "task": {"type": "worker", "index": 0},
    }
    with pytest.raises(errors.UnsupportedConfigurationError, match="parameter-server"):
        ft.strategies.cluster_from_tf_config({"TF_CONFIG": json.dumps(config)})


def test_single_task_or_no_tf_config_is_one_process() -> None:
    assert ft.strategies.cluster_from_tf_config({}) is None
    one = {"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}
    assert ft.strategies.cluster_from_tf_config({"TF_CONFIG": json.dumps(one)}) is None


def test_auto_on_one_process_has_a_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with ft.strategies.auto().scope():
        pass


def test_single_process_coordinator_behaves() -> None:
    coordinator = ft.strategies.SingleProcess()
    assert (coordinator.process_index, coordinator.num_processes, coordinator.is_chief) == (
        0,
        1,
        True,
    )
    first = coordinator.begin(1.0)
    assert coordinator.broadcast("x", "value", 1.0) == "value"
    with pytest.raises(ValueError, match="chief must broadcast"):
        coordinator.broadcast("x", None, 1.0)
    coordinator.publish("k", "first")
    coordinator.publish("k", "second")  # the first writer wins
    assert coordinator.wait_value("k", 0.01) == "first"
    assert coordinator.begin(1.0) == first + 1
    assert coordinator.wait_value("k", 0.01) is None  # a new fit sees none of the last's


class _Store:
    """An in-memory key-value store with barriers, shared by threads posing as processes."""

    def __init__(self, count: int) -> None:
        self.values: dict[str, str] = {}
        self.cond = threading.Condition()
        self.count = count
        self.arrived: dict[str, int] = {}


class _ThreadCoordinator(KeyValueCoordinator):
    def __init__(self, store: _Store, index: int) -> None:
        super().__init__(index, store.count)
        self.store = store
        self._fits_begun = itertools.count(1)  # each thread is a process of its own

    def _set(self, key: str, value: str) -> None:
        with self.store.cond:
            if key in self.store.values:
                raise RuntimeError(f"ALREADY_EXISTS: {key}")
            self.store.values[key] = value
            self.store.cond.notify_all()

    def _get(self, key: str, timeout_ms: int) -> str:
        with self.store.cond:
            if not self.store.cond.wait_for(lambda: key in self.store.values, timeout_ms / 1000):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.store.values[key]

    def _delete(self, key: str) -> None:
        with self.store.cond:
            self.store.values.pop(key, None)

    def _wait_at_barrier(self, barrier_id: str, timeout_ms: int) -> None:
        with self.store.cond:
            if self.store.arrived.get(barrier_id, 0) >= self.store.count:
                raise RuntimeError(f"barrier {barrier_id} was already passed")
            self.store.arrived[barrier_id] = self.store.arrived.get(barrier_id, 0) + 1
            self.store.cond.notify_all()
            if not self.store.cond.wait_for(
                lambda: self.store.arrived[barrier_id] >= self.store.count, timeout_ms / 1000
            ):
                raise RuntimeError(f"DEADLINE_EXCEEDED: {barrier_id}")


def _fit_twice(coordinator: _ThreadCoordinator, results: dict) -> None:
    seen = []
    for value in ("first", "second"):  # the same names in both fits
        coordinator.begin(5.0)
        seen.append(coordinator.broadcast("restore-point", value, 5.0))
        coordinator.barrier("restored", 5.0)
    results[coordinator.process_index] = seen


def _as_two_processes(body: Any) -> tuple[_Store, dict]:
    """Run `body(coordinator, results)` on two threads posing as processes."""
    store, results = _Store(2), {}
    threads = [
        threading.Thread(target=body, args=(_ThreadCoordinator(store, i), results))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return store, results


def test_names_are_unique_per_fit_so_a_second_fit_works() -> None:
    store, results = _as_two_processes(_fit_twice)
    assert results == {0: ["first", "second"], 1: ["first", "second"]}
    generations = {key.split("/")[1] for key in store.values}
    assert len(generations) == 2, sorted(store.values)


def _decide_each_step(coordinator: _ThreadCoordinator, results: dict) -> None:
    coordinator.begin(5.0)
    seen = []
    for step in range(6):
        busy = str(step % 2) if coordinator.is_chief else None
        seen.append(coordinator.decide("move-save", busy, 5.0))
        coordinator.barrier("step", 5.0)  # the training step's collective
    results[coordinator.process_index] = seen


def test_a_decision_per_step_reaches_every_process_and_old_ones_are_deleted() -> None:
    store, results = _as_two_processes(_decide_each_step)
    expected = ["0", "1", "0", "1", "0", "1"]
    assert results == {0: expected, 1: expected}
    kept = sorted(key for key in store.values if "/move-save/" in key)
    assert len(kept) == 2, kept  # the last two of six: the store does not grow per step


def test_a_process_that_does_not_begin_the_same_fit_is_named() -> None:
    store = _Store(2)
    coordinator = _ThreadCoordinator(store, 0)
    with pytest.raises(errors.BarrierTimeoutError, match="Worker 1 did not begin fit number"):
        coordinator.begin(0.2)


def test_strategies_imports_as_ft_strategies() -> None:
    import importlib.util

    spec = importlib.util.find_spec("ft.strategies")
    assert spec is not None
    assert ft.strategies.__name__ == "ft.strategies"


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "10"])
def test_invalid_timeout_is_refused(bad, tmp_path) -> None:
    with pytest.raises(ValueError, match="Invalid value for argument `timeout`"):
        ft.BackupAndRestore(tmp_path, timeout=bad)


def _two_threads_each(coordinator: _ThreadCoordinator, results: dict) -> None:
    """The training thread and the save pipeline's thread of one 'process', each making
    broadcasts and barriers, interleaved differently on each process."""
    coordinator.begin(5.0)
    saves = coordinator.for_thread("saves")
    assert coordinator.for_thread("saves") is saves
    rng = random.Random(coordinator.process_index)
    seen: dict[str, list[str]] = {"train": [], "saves": []}

    def calls(who: Any, name: str) -> None:
        for n in range(5):
            time.sleep(rng.uniform(0, 0.02))
            value = f"{name}-{n}" if who.is_chief else None
            seen[name].append(who.broadcast(name, value, 5.0))
            who.barrier(f"{name}-done", 5.0)

    thread = threading.Thread(target=calls, args=(saves, "saves"))
    thread.start()
    calls(coordinator, "train")
    thread.join(30)
    results[coordinator.process_index] = seen


def test_a_second_thread_counts_its_names_apart_from_the_training_thread() -> None:
    # With one count for both threads, the two processes would name their calls
    # differently as the threads interleave, and wait on keys the other never sets.
    store, results = _as_two_processes(_two_threads_each)
    expected = {name: [f"{name}-{n}" for n in range(5)] for name in ("train", "saves")}
    assert results == {0: expected, 1: expected}
    assert any(key.split("/")[2] == "saves" for key in store.values), sorted(store.values)
