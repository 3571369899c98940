"""ft.strategies: TF_CONFIG parsing errors and the one-process defaults."""

from __future__ import annotations

import json

import pytest

import ft
from ft import errors


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


def test_single_process_coordinator_satisfies_the_protocol() -> None:
    coordinator = ft.strategies.SingleProcess()
    assert isinstance(coordinator, ft.strategies.Coordinator)
    assert coordinator.broadcast("x", "value", 1.0) == "value"
    coordinator.barrier("x", 1.0)


def test_strategies_imports_as_ft_strategies() -> None:
    import importlib.util

    spec = importlib.util.find_spec("ft.strategies")
    assert spec is not None
    assert ft.strategies.__name__ == "ft.strategies"


@pytest.mark.parametrize("bad", [0, -1, float("inf"), "10"])
def test_invalid_timeout_is_refused(bad, tmp_path) -> None:
    with pytest.raises(ValueError, match="Invalid value for argument `timeout`"):
        ft.BackupAndRestore(tmp_path, timeout=bad)
