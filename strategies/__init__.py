"""Engine adapters, imported as `ft.strategies`: one module per distributed engine.

`auto()` returns the distribution the current Keras backend and environment
call for; `coordinator_for(model)` returns how ft's callback talks to the
other processes of that run. Engines are imported only when used.
"""

from __future__ import annotations

from typing import Any

from ft.strategies.base import (
    DEFAULT_TIMEOUT,
    ClusterSpec,
    Coordinator,
    DefaultScope,
    SingleProcess,
    cluster_from_tf_config,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "ClusterSpec",
    "Coordinator",
    "DefaultScope",
    "SingleProcess",
    "auto",
    "cluster_from_tf_config",
    "coordinator_for",
]


def auto(heartbeat_timeout: float | None = None, collective_timeout: float | None = None) -> Any:
    """The distribution for this backend and environment: an object with `.scope()`.

    Call on every process, before building the model. Under TensorFlow with a
    multi-worker `TF_CONFIG` (as `python -m ft.launch` and cluster managers set
    it), a `tf.distribute.MultiWorkerMirroredStrategy` on which Keras 3 `fit`
    works; on one process, the default strategy (TensorFlow) or a scope that
    does nothing.

    Args:
        heartbeat_timeout: Seconds after which a silent peer is declared dead.
            Defaults to 30.
        collective_timeout: Seconds one collective may wait, or None (the
            default) to rely on the heartbeat.
    """
    import keras

    backend = keras.backend.backend()
    cluster = cluster_from_tf_config()
    if backend == "tensorflow":
        if cluster is not None:
            from ft.strategies import tensorflow as tf_adapter

            return tf_adapter.multi_worker_strategy(
                cluster,
                heartbeat_timeout=heartbeat_timeout or tf_adapter.DEFAULT_HEARTBEAT_TIMEOUT,
                collective_timeout=collective_timeout,
            )
        import tensorflow as tf

        return tf.distribute.get_strategy()
    return DefaultScope()


def coordinator_for(model: Any) -> Coordinator:
    """How the processes training `model` coordinate. Call on all processes."""
    import keras

    if keras.backend.backend() == "tensorflow":
        from ft.strategies import tensorflow as tf_adapter

        strategy = model.distribute_strategy
        if tf_adapter.is_multi_worker(strategy):
            return tf_adapter.TFCoordinator(strategy)
    return SingleProcess()
