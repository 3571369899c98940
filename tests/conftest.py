"""Tests run in-process on one backend (jax unless KERAS_BACKEND says otherwise);
tests that need both backends run `tests/scenario.py` in processes of their own."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# ft's own plugin (the `ft_job` fixture), also where ft is installed without its entry points.
pytest_plugins = ["ft.testing.pytest_plugin"]

BACKENDS = ("tensorflow", "jax")


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory):
    """`references(backend, *scenario_args)`: an uninterrupted 2-worker run's weights,
    shared by every test of this session that asks for the same one."""
    from tests.helpers import References

    return References(tmp_path_factory)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)
