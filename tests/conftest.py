"""Tests run in-process on one backend (jax unless KERAS_BACKEND says otherwise);
tests that need both backends run `tests/scenario.py` in processes of their own."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# ft's own plugin (the `ft_job` fixture), also where ft is installed without its entry points.
pytest_plugins = ["ft.testing.pytest_plugin"]

BACKENDS = ("tensorflow", "jax")
_JAX_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """One JAX compilation cache for the whole session: every test process and every
    worker process a test starts compiles the same few small models, hundreds of
    times in all. The controller creates it; xdist's workers and the processes tests
    start inherit it through the environment. A size limit turns on JAX's file lock,
    so a process never reads an entry another is still writing."""
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix="ft-tests-jax-cache-")
    config.stash[_JAX_CACHE] = directory
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2 << 30)
    # The models are small: every compilation is worth keeping.
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_JAX_CACHE, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that run real processes first (a stable sort): under `-n auto` they start
    at once and the quick ones fill in beside them, instead of one worker finishing
    the long tail alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory):
    """`references(backend, *scenario_args)`: an uninterrupted 2-worker run's weights;
    `references.single(backend, *scenario_args)`: a single-process run's output file.
    Each made once per session and shared by every test (and every xdist worker)
    that asks for the same one."""
    from tests.helpers import References

    base = tmp_path_factory.getbasetemp()
    # Under xdist every worker's base is a folder of the session's own.
    directory = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "references"
    directory.mkdir(exist_ok=True)
    return References(directory)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def _object_store_servers() -> Iterator[dict[str, Any]]:
    """Started on first use, one per scheme, stopped at the end of the session."""
    from tests import object_stores

    with contextlib.ExitStack() as stack:
        started: dict[str, Any] = {}

        def get(scheme: str) -> Any:
            if scheme not in started:
                started[scheme] = stack.enter_context(object_stores.SERVERS[scheme]())
            return started[scheme]

        yield {"get": get}


@pytest.fixture(params=["s3", "gs"])
def bucket(
    request: pytest.FixtureRequest,
    _object_store_servers: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> Any:
    """A fresh `s3://` or `gs://` backup_dir on a real local server.

    The server's variables are set in this process (and so reach the
    subprocesses it starts); `bucket.url` is unique to the test.
    """
    import uuid

    store = _object_store_servers["get"](request.param)
    for name, value in store.env.items():
        monkeypatch.setenv(name, value)
    return _Bucket(store.scheme, store.url(f"run-{uuid.uuid4().hex[:10]}"), dict(store.env))


class _Bucket:
    def __init__(self, scheme: str, url: str, env: dict[str, str]) -> None:
        self.scheme, self.url, self.env = scheme, url, env
