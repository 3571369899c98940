"""A private copy of the training state for a backup, taken where the state lives.

Runs on the process that writes a backup. The training thread calls
`Snapshotter.take` and waits only for a copy made where the state lives; the
save pipeline's thread then calls `Snapshot.host` for host arrays to write.

- JAX on a GPU or TPU: one device-to-device copy of every variable in one
  dispatch (a jitted copy without donation, so the buffers Keras's trainer
  donates to the next step are never referenced). `host` then moves the copy to
  page-locked host memory (`memory_kind="pinned_host"`, pooled by the engine's
  host allocator from save to save) and frees the device copy. When the device
  has no room for the copy, the variables are copied to host one at a time on
  the training thread instead, and ft says so once in the log.
- JAX on the CPU and TensorFlow: one memcpy per variable into host buffers
  allocated at the first save and reused by the next ones.
- JAX multi-host (every process writes its own shards): `take_sharded` makes
  the same one-dispatch device copy of the global arrays, keeping their
  shardings (every process joins it at the same step), and the pipeline hands
  the copies to Orbax, which moves each process's shards to host as it writes
  them. The device copy is held until the write has read it.

A snapshot is always a copy, never a view of a live variable. At most one is
alive at a time (the pipeline holds one save in flight), so the reused host
buffers are never written while a save still reads them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import errors
from ft.log import get_logger

logger = get_logger()


class Snapshot:
    """The state of one step: host arrays, a device copy on its way to the host, or
    (JAX multi-host) a device copy of global arrays that Orbax moves as it writes."""

    def __init__(
        self,
        groups: dict[str, int],
        nbytes: int,
        host_arrays: list[Any] | None = None,
        finish: Callable[[], list[np.ndarray]] | None = None,
        seconds: float = 0.0,
        where: str = "host",
    ) -> None:
        self._groups = groups
        self._arrays = host_arrays
        self._finish = finish
        self.nbytes = nbytes
        #: Seconds the training thread spent taking the snapshot.
        self.take_seconds = seconds
        #: Seconds `host` spent moving the copy to host memory (0 for host copies).
        self.host_seconds = 0.0
        #: Where the copy was made: "host", "device", "host-chunked" or "device-sharded".
        self.where = where

    def host(self) -> dict[str, list[Any]]:
        """The snapshot as the arrays to write, grouped as a backup stores them: host
        arrays, or a "device-sharded" snapshot's global arrays.

        Call from the thread that writes the backup; the first call finishes
        the transfer from the device (and frees the device copy).
        """
        if self._arrays is None:
            assert self._finish is not None
            start = time.perf_counter()
            self._arrays = self._finish()
            self._finish = None
            self.host_seconds = time.perf_counter() - start
        out: dict[str, list[np.ndarray]] = {}
        index = 0
        for group, count in self._groups.items():
            out[group] = self._arrays[index : index + count]
            index += count
        return out


class Snapshotter:
    """Takes snapshots of one model's variables, reusing host buffers from save to save."""

    def __init__(self) -> None:
        self._buffers: list[np.ndarray] = []
        self._told_chunked = False
        self._told_pageable = False
        self._checked_copies = False
        #: Where the last snapshot was made: "host", "device", "host-chunked" or
        #: "device-sharded".
        self.last_where = ""

    def release(self) -> None:
        """Drop the reused host buffers (at the end of `fit`)."""
        self._buffers = []

    def take(self, variables: dict[str, list[Any]]) -> Snapshot:
        """Copy every variable of `variables` (groups in order). Training thread.

        Returns once the copy is complete where it is made: later training
        steps cannot change it.
        """
        import keras

        start = time.perf_counter()
        groups = {group: len(vs) for group, vs in variables.items()}
        values = [v.value for vs in variables.values() for v in vs]
        if keras.backend.backend() == "jax" and values and _on_accelerator(values):
            copies = self._device_copy(values)
            if copies is not None:
                self.last_where = "device"
                return Snapshot(
                    groups,
                    sum(int(c.nbytes) for c in copies),
                    finish=lambda: self._to_host(copies),
                    seconds=time.perf_counter() - start,
                    where="device",
                )
            arrays = [np.asarray(_device_get(v)) for v in values]
            where = "host-chunked"
        else:
            arrays = self._host_copy(values)
            where = "host"
        nbytes = sum(int(a.nbytes) for a in arrays)
        self.last_where = where
        return Snapshot(groups, nbytes, arrays, seconds=time.perf_counter() - start, where=where)

    def take_sharded(self, variables: dict[str, list[Any]]) -> Snapshot | None:
        """A device copy of every variable of `variables`, keeping their shardings,
        or None when the device has no room for it. JAX multi-host; training
        thread of every process, at the same step (the copy is one program over
        all devices)."""
        start = time.perf_counter()
        groups = {group: len(vs) for group, vs in variables.items()}
        values = [v.value for vs in variables.values() for v in vs]
        copies = self._device_copy(values, keep_shardings=True)
        if copies is None:
            return None
        if not self._checked_copies:
            _check_not_aliased(values, copies)
            self._checked_copies = True
        self.last_where = "device-sharded"
        return Snapshot(
            groups,
            sum(int(c.nbytes) for c in copies),
            host_arrays=copies,
            seconds=time.perf_counter() - start,
            where="device-sharded",
        )

    # ------------------------------------------------------------ host copies
    def _host_copy(self, values: list[Any]) -> list[np.ndarray]:
        """One memcpy per value into the reused host buffers."""
        if len(self._buffers) != len(values):
            self._buffers = [np.empty(0)] * len(values)
        for index, value in enumerate(values):
            source = _host_view(value)
            buffer = self._buffers[index]
            if buffer.shape != source.shape or buffer.dtype != source.dtype:
                buffer = self._buffers[index] = np.empty_like(source)
            np.copyto(buffer, source, casting="no")
        return list(self._buffers)

    # ---------------------------------------------------------- device copies
    def _device_copy(self, values: list[Any], keep_shardings: bool = False) -> list[Any] | None:
        """One device-to-device copy of every value in one dispatch, or None without room."""
        try:
            # Not waited for: the copy is ordered before the next training step
            # on the device, and JAX keeps a donated input alive until every
            # computation already dispatched on it has read it.
            if keep_shardings:
                copies = _copy_keeping(tuple(v.sharding for v in values))(values)
            else:
                copies = _copy_all()(values)
        except Exception as e:  # XlaRuntimeError: RESOURCE_EXHAUSTED
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            if not self._told_chunked:
                self._told_chunked = True
                logger.warning(
                    "the device has no room for a second copy of the training state (%s); "
                    "backups copy it to host memory one variable at a time on the training "
                    "thread instead, which blocks training longer",
                    str(e).splitlines()[0][:200],
                )
            return None
        return list(copies)

    def _to_host(self, copies: list[Any]) -> list[np.ndarray]:
        """Move a device copy to host memory, page-locked where the engine offers it."""
        import jax

        try:
            shardings = [c.sharding.with_memory_kind("pinned_host") for c in copies]
            pinned = jax.device_put(copies, shardings)
            jax.block_until_ready(pinned)
        except Exception as e:  # no pinned_host memory on this platform or version
            if not self._told_pageable:
                self._told_pageable = True
                logger.info(
                    "page-locked host memory unavailable (%s); backups copy to pageable memory",
                    str(e).splitlines()[0][:200],
                )
            for c in copies:
                c.copy_to_host_async()
            arrays = [np.asarray(c) for c in copies]
        else:
            copies.clear()  # free the device copy before the host arrays are written
            arrays = [np.asarray(p) for p in pinned]
        copies.clear()
        return arrays


_COPY_ALL: Any = None


def _copy_all() -> Any:
    """A jitted copy of a list of arrays, compiled once per process and list layout."""
    global _COPY_ALL
    if _COPY_ALL is None:
        import jax
        import jax.numpy as jnp

        # No donation: the inputs are Keras's live buffers.
        _COPY_ALL = jax.jit(lambda xs: [jnp.copy(x) for x in xs])
    return _COPY_ALL


_COPY_KEEPING: tuple[Any, Any] = (None, None)  # (shardings, its jitted copy)


def _copy_keeping(shardings: tuple[Any, ...]) -> Any:
    """A jitted copy of a list of global arrays onto `shardings` (theirs), compiled
    once per process and layout."""
    global _COPY_KEEPING
    if _COPY_KEEPING[0] != shardings:
        import jax
        import jax.numpy as jnp

        copy = jax.jit(lambda xs: [jnp.copy(x) for x in xs], out_shardings=list(shardings))
        _COPY_KEEPING = (shardings, copy)
    return _COPY_KEEPING[1]


def _check_not_aliased(values: list[Any], copies: list[Any]) -> None:
    """Raise unless every copy's local buffers are apart from its value's: Keras's JAX
    trainer donates the live buffers to the next step."""
    import jax

    for value, copy in zip(values, copies, strict=True):
        for mine, theirs in zip(copy.addressable_shards, value.addressable_shards, strict=True):
            if mine.data.unsafe_buffer_pointer() == theirs.data.unsafe_buffer_pointer():
                raise errors.IncompatibleEngineError(
                    f"A jitted jnp.copy returned the live buffer of a variable instead of a "
                    f"copy (jax {jax.__version__}): a background backup would read buffers "
                    "the next training step overwrites. Pass async_save=False to "
                    "ft.BackupAndRestore, and report this with your JAX version."
                )


def _on_accelerator(values: list[Any]) -> bool:
    devices = getattr(values[0], "devices", None)
    if devices is None:
        return False
    return any(d.platform != "cpu" for d in devices())


def _host_view(value: Any) -> np.ndarray:
    """The value as a host array, without a copy where the engine allows it."""
    read = getattr(value, "read_value", None)
    if read is not None:
        # A tf.Variable: `read_value` aliases its buffer (a SyncOnRead variable
        # under tf.distribute aggregates across replicas there). `numpy()`
        # copies a CPU tensor (into fresh memory: half the snapshot's time at
        # 0.25 GB); `_numpy()`, the TensorFlow internal under it, views the
        # tensor's memory where it can and copies where it cannot, so the
        # values are the tensor's either way, and the view keeps its buffer
        # alive until the copy into the snapshot is done.
        tensor = read()
        view = getattr(tensor, "_numpy", None)
        return np.asarray(view() if view is not None else tensor.numpy())
    return np.asarray(value)  # a JAX CPU array: a view of its buffer


def _device_get(value: Any) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(value))
