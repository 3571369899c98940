"""tf.distribute multi-worker: a MultiWorkerMirroredStrategy for the cluster, and its coordinator.

Call `multi_worker_strategy()` on every worker, before building the model.
Barriers and small broadcasts go through TensorFlow's coordination service
(the same one MWMS uses for its collectives), each with a finite timeout.
"""

from __future__ import annotations

import logging
from typing import Any

from ft import errors
from ft.strategies.base import DEFAULT_TIMEOUT, KeyValueCoordinator
from ft.strategies.cluster_env import ClusterSpec

logger = logging.getLogger("ft")

DEFAULT_HEARTBEAT_TIMEOUT = 30.0


def multi_worker_strategy(
    cluster: ClusterSpec,
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT,
    collective_timeout: float = DEFAULT_TIMEOUT,
) -> Any:
    """A MultiWorkerMirroredStrategy for `cluster`. Call on all workers.

    Args:
        cluster: The cluster, from `cluster_env.detect()`: TF_CONFIG, or another
            environment that names every worker's address.
        heartbeat_timeout: Seconds after which the coordination service declares
            a silent worker dead, so survivors fail instead of hanging.
        collective_timeout: Seconds a single collective may wait before it
            fails with DeadlineExceeded (ft's `BarrierTimeoutError`).
    """
    import tensorflow as tf
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    from ft.strategies import keras_mwms_patch

    resolver = _resolver(cluster)
    if context.context().coordination_service is None:
        spec = resolver.cluster_spec()
        jobs = [
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=spec.num_tasks(job))
            for job in ("chief", "worker")
            if job in spec.jobs
        ]
        context.context().configure_coordination_service(
            service_type="standalone",
            service_leader=multi_worker_util.coordination_leader(spec),
            coordinated_jobs=jobs,
            heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
            shutdown_barrier_timeout_in_ms=int(heartbeat_timeout * 1000),
        )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=options
    )
    if keras_mwms_patch.apply():
        logger.debug("patched Keras fit for MultiWorkerMirroredStrategy (keras#20585)")
    return strategy


def _resolver(cluster: ClusterSpec) -> Any:
    """TF_CONFIG's own resolver, or one worker job with an address per process."""
    if cluster.source == "GKE TPU":
        raise errors.UnsupportedConfigurationError(
            "TPU_WORKER_ID and TPU_WORKER_HOSTNAMES describe a GKE TPU slice, and KERAS_BACKEND "
            "is tensorflow: training on TPUs under TensorFlow needs TPUStrategy, which ft does "
            "not provide (MultiWorkerMirroredStrategy would train on the hosts' CPUs). Use "
            "KERAS_BACKEND=jax on TPUs."
        )
    if cluster.source != "TF_CONFIG" and len(cluster.addresses) != cluster.num_processes:
        raise errors.UnsupportedConfigurationError(
            f"The {cluster.source} variables name only the JAX coordinator "
            f"({cluster.coordinator_address}) on another host, and TensorFlow's "
            f"MultiWorkerMirroredStrategy needs the address of each of the "
            f"{cluster.num_processes} workers. Run TensorFlow jobs from an environment that "
            "names every worker: TF_CONFIG (a Kubeflow TFJob), "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES with one address per process, or SLURM."
        )
    import tensorflow as tf

    if cluster.source == "TF_CONFIG":
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": list(cluster.addresses)}),
        task_type="worker",
        task_id=cluster.process_index,
        rpc_layer="grpc",
    )


def is_multi_worker(strategy: Any) -> bool:
    import tensorflow as tf

    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.cluster_resolver is not None
        and strategy.extended._num_workers > 1
    )


class TFCoordinator(KeyValueCoordinator):
    """Coordinator over TensorFlow's coordination service. One per process."""

    def __init__(self, strategy: Any) -> None:
        resolver = strategy.cluster_resolver
        spec = resolver.cluster_spec()
        chiefs = spec.num_tasks("chief") if "chief" in spec.jobs else 0
        index = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        super().__init__(int(index), int(strategy.extended._num_workers))

    def _wait_at_barrier(self, barrier_id: str, timeout_ms: int) -> None:
        from tensorflow.python.eager import context

        context.context().wait_at_barrier(barrier_id, timeout_ms)

    def _set(self, key: str, value: str) -> None:
        from tensorflow.python.eager import context

        context.context().set_config_key_value(key, value)

    def _get(self, key: str, timeout_ms: int) -> str:
        from tensorflow.python.eager import context

        return str(context.context().get_config_key_value(key, timeout_ms))

    def _delete(self, key: str) -> None:
        from tensorflow.python.eager import context

        context.context().delete_config_key_value(key)
