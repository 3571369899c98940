"""A restore reads Orbax's arrays directly with TensorStore, and gets what Orbax would.

`ft.store.arrays.read` skips Orbax's restore machinery when this process holds
every array whole; these tests hold it to Orbax's own names and values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ft import log
from ft.metadata import BackupRecord
from ft.store import arrays as array_io
from ft.store.posix import PosixStore


def _saved(tmp_path: Path) -> tuple[PosixStore, str, dict[str, list[np.ndarray]]]:
    rng = np.random.default_rng(3)
    arrays = {
        "model": [rng.normal(size=s).astype("float32") for s in [(7,), (30, 20), (3, 4, 5)]],
        "optimizer": [np.array(11, "int64"), rng.normal(size=(30, 20)).astype("float32")],
        "metrics": [np.array(2.5, "float32")],
    }
    store = PosixStore(tmp_path)
    store.prepare()
    path = store.write(BackupRecord(0, 1, 1, 1, "jax", 1, "now", {"model": []}), arrays)
    return store, path, arrays


def _orbax_read(path: str, target: dict[str, list[Any]]) -> Any:
    checkpointer = array_io.new_checkpointer()
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    try:
        return checkpointer.restore(
            f"{path}/state", args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args)
        )
    finally:
        checkpointer.close()


def test_direct_read_uses_orbax_names() -> None:
    target = {"model": [np.zeros(2), np.zeros(3)], "optimizer": [np.zeros(())], "metrics": []}
    names = ocp.tree.get_param_names(target)
    for group, values in target.items():
        for index in range(len(values)):
            assert names[group][index] == array_io.orbax_name(group, index)


def test_direct_read_of_host_arrays_matches_orbax(tmp_path: Path) -> None:
    store, path, arrays = _saved(tmp_path)
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    direct = store.read_arrays(path, target)
    expected = _orbax_read(path, target)
    for group, values in arrays.items():
        for saved, got, orbax in zip(values, direct[group], expected[group], strict=True):
            assert got.dtype == saved.dtype and got.shape == saved.shape
            np.testing.assert_array_equal(got, saved)
            np.testing.assert_array_equal(got, orbax)
            assert got.ctypes.data % 64 == 0  # aligned: the engines take it without a copy
    store.close()


def test_direct_read_puts_jax_arrays_on_their_shardings(tmp_path: Path) -> None:
    store, path, arrays = _saved(tmp_path)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {
        group: [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in values]
        for group, values in arrays.items()
    }
    out = store.read_arrays(path, target)
    for group, values in arrays.items():
        for saved, got in zip(values, out[group], strict=True):
            assert isinstance(got, jax.Array) and got.sharding == sharding
            np.testing.assert_array_equal(np.asarray(got), saved)
    store.close()


def test_arrays_not_where_orbax_names_them_are_read_by_orbax(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, path, arrays = _saved(tmp_path)
    monkeypatch.setattr(array_io, "orbax_name", lambda group, index: f"elsewhere.{group}.{index}")
    calls = []
    made = store._orbax_reader

    def orbax() -> Any:
        calls.append(1)
        return made()

    monkeypatch.setattr(store, "_orbax_reader", orbax)
    target = {group: [np.zeros_like(a) for a in values] for group, values in arrays.items()}
    out = store.read_arrays(path, target)
    assert calls
    for group, values in arrays.items():
        for saved, got in zip(values, out[group], strict=True):
            np.testing.assert_array_equal(got, saved)
    store.close()


def test_a_save_neither_copies_the_snapshot_nor_encodes_on_every_core(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import copy
    import inspect

    # orbax-checkpoint before 0.12.5 always copies: ft then works and says so once.
    orbax_can_skip_copy = (
        "deepcopy_host_arrays"
        in inspect.signature(ocp.type_handlers.NumpyHandler.__init__).parameters
    )
    monkeypatch.setattr(log, "_said", set())  # said once per process

    arrays = {"model": [np.arange(1000, dtype="float32"), np.ones((20, 30), "float32")]}
    copied: list[Any] = []
    deepcopy = copy.deepcopy

    def spy_deepcopy(value: Any, *args: Any) -> Any:
        if any(value is a for a in arrays["model"]):
            copied.append(value)
        return deepcopy(value, *args)

    contexts: list[dict[str, Any]] = []
    serialize = ocp.type_handlers.NumpyHandler.serialize

    async def spy_serialize(self: Any, values: Any, infos: Any, args: Any = None) -> Any:
        contexts.append(infos[0].ts_context.spec.to_json())
        return await serialize(self, values, infos, args)

    monkeypatch.setattr(copy, "deepcopy", spy_deepcopy)
    monkeypatch.setattr(ocp.type_handlers.NumpyHandler, "serialize", spy_serialize)
    store = PosixStore(tmp_path)
    store.prepare()
    path = store.write(BackupRecord(0, 1, 1, 1, "jax", 1, "now", {"model": []}), arrays)
    said = "has no `deepcopy_host_arrays` before 0.12.5" in caplog.text
    if orbax_can_skip_copy:
        assert copied == [] and not said
    else:
        assert len(copied) == len(arrays["model"]) and said
    assert contexts and all(
        c["data_copy_concurrency"] == {"limit": array_io.encoding_threads()} for c in contexts
    )
    target = {"model": [np.zeros_like(a) for a in arrays["model"]]}
    for saved, got in zip(arrays["model"], store.read_arrays(path, target)["model"], strict=True):
        np.testing.assert_array_equal(got, saved)
    store.close()


SHARDED_READ = """
import sys
import numpy as np, jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ft.metadata import BackupRecord
from ft.store.posix import PosixStore
assert len(jax.devices()) == 2
store = PosixStore(sys.argv[1])
store.prepare()
a = np.arange(48, dtype=np.float32).reshape(8, 6)
path = store.write(BackupRecord(0, 1, 1, 1, "jax", 1, "now", {"model": []}), {"model": [a, a * 2]})
mesh = Mesh(np.array(jax.devices()), ("x",))
shardings = [NamedSharding(mesh, P("x")), NamedSharding(mesh, P())]
target = {"model": [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for s in shardings]}
out = store.read_arrays(path, target)
for got, want, sharding in zip(out["model"], [a, a * 2], shardings, strict=True):
    assert got.sharding == sharding, got.sharding
    np.testing.assert_array_equal(np.asarray(got), want)
print("read", [[s.data.shape for s in got.addressable_shards] for got in out["model"]])
"""


def test_direct_read_places_arrays_on_shardings_across_devices(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    done = subprocess.run(
        [sys.executable, "-c", SHARDED_READ, str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "read [[(4, 6), (4, 6)], [(8, 6), (8, 6)]]" in done.stdout
