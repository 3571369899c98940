"""JAX multi-host: `jax.distributed` for the cluster, a Keras distribution, a coordinator.

Call `initialize()` (or `ft.strategies.auto()`) on every process before any
other JAX call. Barriers and broadcasts go through the `jax.distributed`
coordination service client, each with a finite timeout.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ft import errors
from ft.strategies.base import KeyValueCoordinator
from ft.strategies.cluster_env import ClusterSpec

logger = logging.getLogger("ft")

DEFAULT_HEARTBEAT_TIMEOUT = 30.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# Environment variables through which JAX detects a cluster by itself.
_JAX_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def initialize(
    cluster: ClusterSpec | None, heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
) -> None:
    """Start `jax.distributed` once per process. Call on all processes, first.

    `cluster` comes from `cluster_env.detect()`. Where JAX detects that
    cluster by itself (SLURM, GKE TPU), `jax.distributed.initialize()` runs
    without arguments and the result is checked against `cluster`; otherwise
    the coordinator (process 0's address), the count and the index are passed.
    Without a cluster, JAX's own detection runs where its environment is set
    (Open MPI, JAX_COORDINATOR_ADDRESS); otherwise this is one process.
    """
    import jax

    if jax.distributed.is_initialized():
        return
    timeouts = dict(
        heartbeat_timeout_seconds=max(int(heartbeat_timeout), 1),
        shutdown_timeout_seconds=int(DEFAULT_SHUTDOWN_TIMEOUT),
        initialization_timeout=300,
    )
    if cluster is not None and cluster.jax_detects:
        # SLURM, GKE TPU: JAX's own detection (coordinator port, TPU slices, local devices).
        jax.distributed.initialize(**timeouts)  # type: ignore[arg-type]
        seen = (int(jax.process_index()), int(jax.process_count()))
        if seen != (cluster.process_index, cluster.num_processes):
            raise errors.UnsupportedConfigurationError(
                f"JAX's own detection of the {cluster.source} cluster made this process "
                f"{seen[0]} of {seen[1]}, but its variables say process "
                f"{cluster.process_index} of {cluster.num_processes}: the chief would not be "
                "the same process on both engines. Check the job's environment "
                "(docs/clusters.md)."
            )
    elif cluster is not None:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator_address,
            num_processes=cluster.num_processes,
            process_id=cluster.process_index,
            **timeouts,  # type: ignore[arg-type]
        )
    elif any(name in os.environ for name in _JAX_CLUSTER_ENV):
        jax.distributed.initialize(**timeouts)  # type: ignore[arg-type]
    else:
        return
    logger.debug("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def common_seed(seed: int | None) -> int:
    """Seed Keras, NumPy and Python identically on every process. Call on all processes.

    Without a `seed`, process 0 draws one and broadcasts it, so replicated
    variables are initialized to the same values everywhere.
    """
    import jax
    import keras
    import numpy as np

    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            seed = int(multihost_utils.broadcast_one_to_all(np.int32(seed)))
    keras.utils.set_random_seed(seed)
    return seed


def distribution(layout_map: Any = None) -> Any:
    """`DataParallel` over every device of every process, or `ModelParallel(layout_map)`.

    Each process feeds its own share of the data (`auto_shard_dataset=False`),
    with `batch_size` counted per process.
    """
    import jax
    import keras

    if layout_map is not None:
        return keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch", auto_shard_dataset=False
        )
    return keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)


def is_multi_process() -> bool:
    import jax

    return bool(jax.process_count() > 1)


class JaxCoordinator(KeyValueCoordinator):
    """Coordinator over the `jax.distributed` client. One per process."""

    def __init__(self) -> None:
        import jax
        from jax._src import distributed

        client = distributed.global_state.client
        if client is None:
            raise RuntimeError("jax.distributed is not initialized: call ft.strategies.auto()")
        self._client: Any = client
        super().__init__(int(jax.process_index()), int(jax.process_count()))

    def _wait_at_barrier(self, barrier_id: str, timeout_ms: int) -> None:
        self._client.wait_at_barrier(barrier_id, timeout_ms)

    def _set(self, key: str, value: str) -> None:
        self._client.key_value_set(key, value)

    def _get(self, key: str, timeout_ms: int) -> str:
        return str(self._client.blocking_key_value_get(key, timeout_ms))

    def _delete(self, key: str) -> None:
        self._client.key_value_delete(key)
