"""Engine adapters, imported as `ft.strategies`: one module per distributed engine.

`auto()` returns the distribution the current Keras backend and environment
call for; `coordinator_for(model)` returns how ft's callback talks to the
other processes of that run. Engines are imported only when used.
"""

from __future__ import annotations

from typing import Any

from ft.strategies import cluster_env
from ft.strategies.base import (
    DEFAULT_TIMEOUT,
    Coordinator,
    DefaultScope,
    SingleProcess,
    missing_worker,
    translate_engine_errors,
)
from ft.strategies.cluster_env import ClusterSpec, cluster_from_tf_config

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClusterSpec",
    "Coordinator",
    "DefaultScope",
    "SingleProcess",
    "auto",
    "cluster_from_tf_config",
    "coordinator_for",
    "every_process_writes",
    "initialize",
    "missing_worker",
    "translate_engine_errors",
]


def auto(
    heartbeat_timeout: float | None = None,
    collective_timeout: float | None = None,
    seed: int | None = None,
    layout_map: Any = None,
) -> Any:
    """The distribution for this backend and environment: an object with `.scope()`.

    Call on every process, before building the model.

    The cluster comes from the first of these that is set: `TF_CONFIG`
    (`python -m ft.launch`, a Kubeflow TFJob); Kubeflow JAXJob's
    `COORDINATOR_ADDRESS`/`COORDINATOR_PORT`/`NUM_PROCESSES`/`PROCESS_ID`;
    Kubeflow Trainer's `JAX_COORDINATOR_ADDRESS`/`JAX_COORDINATOR_PORT`/
    `JAX_NUM_PROCESSES`/`JAX_PROCESS_ID`; Keras's
    `KERAS_DISTRIBUTION_JOB_ADDRESSES`/`_NUM_PROCESSES`/`_PROCESS_ID`; SLURM
    (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_STEP_NODELIST`, from `srun`); GKE
    TPU (`TPU_WORKER_ID`, `TPU_WORKER_HOSTNAMES`). Process 0 is the chief on
    both engines. None of them (or one process): a single-process run. How
    TensorFlow's worker ports are derived: `strategies/cluster_env.py` and
    docs/clusters.md.

    - TensorFlow with a multi-process cluster: a
      `tf.distribute.MultiWorkerMirroredStrategy` on which Keras 3 `fit`
      works. On one process, the default strategy.
    - JAX: `jax.distributed` is initialized for the cluster (process 0 is
      the coordinator; on SLURM and GKE TPU by JAX's own detection, checked
      against the variables), every process is seeded identically, and a
      Keras distribution is returned and set globally: `DataParallel` over
      all devices, or `ModelParallel(layout_map)`. Each process feeds its own
      share of the data; `batch_size` is per process. Call
      `ft.strategies.initialize()` first to build a `layout_map` on the
      global devices.

    Raises:
        ft.errors.UnsupportedConfigurationError: when the description found
            is incomplete (`NUM_PROCESSES` without `PROCESS_ID`, ...) or
            inconsistent (an index out of range, two environments that
            disagree about the number of processes), and under TensorFlow
            when only the coordinator's address is known across hosts.

    Args:
        heartbeat_timeout: Seconds after which a silent peer is declared dead.
            Defaults to 30.
        collective_timeout: TensorFlow only: seconds one collective (a
            training step's all-reduce) may wait for the other workers before
            it fails with `ft.errors.BarrierTimeoutError`. None (the default)
            means 300 s, ft's default `timeout`; a dead or frozen peer is
            detected sooner, by the heartbeat. Under JAX a collective waits
            for a dead or frozen peer at most `heartbeat_timeout`.
        seed: JAX only: the seed every process uses; drawn by process 0 and
            broadcast when None.
        layout_map: JAX only: a `keras.distribution.LayoutMap` for model
            parallelism.
    """
    import keras

    backend = keras.backend.backend()
    cluster = cluster_env.detect()
    if backend == "tensorflow":
        if cluster is not None:
            from ft.strategies import tensorflow as tf_adapter

            return tf_adapter.multi_worker_strategy(
                cluster,
                heartbeat_timeout=heartbeat_timeout or tf_adapter.DEFAULT_HEARTBEAT_TIMEOUT,
                collective_timeout=(
                    DEFAULT_TIMEOUT if collective_timeout is None else collective_timeout
                ),
            )
        import tensorflow as tf

        return tf.distribute.get_strategy()
    if backend == "jax":
        import keras

        from ft.strategies import jax_multihost

        initialize(heartbeat_timeout)
        if cluster is None and not jax_multihost.is_multi_process() and layout_map is None:
            if seed is not None:
                keras.utils.set_random_seed(seed)
            return DefaultScope()
        jax_multihost.common_seed(seed)
        dist = jax_multihost.distribution(layout_map)
        keras.distribution.set_distribution(dist)
        return dist
    return DefaultScope()


def initialize(heartbeat_timeout: float | None = None) -> None:
    """JAX: start `jax.distributed` for this cluster (idempotent). Call on all processes."""
    from ft.strategies import jax_multihost

    jax_multihost.initialize(
        cluster_env.detect(),
        heartbeat_timeout=heartbeat_timeout or jax_multihost.DEFAULT_HEARTBEAT_TIMEOUT,
    )


def coordinator_for(model: Any) -> Coordinator:
    """How the processes training `model` coordinate. Call on all processes."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from ft.strategies import tensorflow as tf_adapter

        strategy = model.distribute_strategy
        if tf_adapter.is_multi_worker(strategy):
            return tf_adapter.TFCoordinator(strategy)
    elif keras.backend.backend() == "jax":
        from ft.strategies import jax_multihost

        if jax_multihost.is_multi_process():
            return jax_multihost.JaxCoordinator()
    return SingleProcess()


def every_process_writes(coordinator: Coordinator) -> bool:
    """True where each process writes its own shards (JAX multi-host), so every
    process takes part in a save; False where the chief alone writes."""
    import keras

    return coordinator.num_processes > 1 and keras.backend.backend() == "jax"
