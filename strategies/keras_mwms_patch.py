"""Two narrow patches that let Keras 3 `model.fit` run under MultiWorkerMirroredStrategy.

Upstream: keras-team/keras#20585, tensorflow/tensorflow#72388. Both failures
are in `keras/src/backend/tensorflow/trainer.py`:

1. `TensorFlowTrainer._maybe_symbolic_build` builds the model from a batch it
   gets with `strategy.reduce("MEAN", batch, axis=None)`, which fails on the
   PerReplica values of a multi-worker batch ("Attempt to convert a value
   (PerReplica...) to a Tensor"). Only the batch's shape and dtype are used,
   so the first local replica's value serves.
2. `reduce_per_replica` reduces scalar metric results across workers with
   `axis=0` ("Invalid reduction dimension 0 for input with 0 dimensions").
   Scalars are reduced with `axis=None`; everything else is untouched.

Both patches act only under a multi-worker strategy and leave every other
case to the original code. `tests/test_tf_multiworker.py` runs Keras without
them and fails once Keras fixes these upstream, so they can then be removed.
"""

from __future__ import annotations

from typing import Any

_applied = False
_originals: dict[str, Any] = {}


def apply() -> bool:
    """Install the patches (idempotent); False when Keras lacks what they wrap."""
    global _applied
    if _applied:
        return True
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original_build = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = tf_trainer.reduce_per_replica
    multi_worker = getattr(tf_trainer, "_collective_all_reduce_multi_worker", None)
    if multi_worker is None:
        return False

    def _maybe_symbolic_build(self: Any, iterator: Any = None, data_batch: Any = None) -> Any:
        strategy = self._distribute_strategy
        if iterator is not None and strategy is not None and multi_worker(strategy):
            for _, _, it in iterator:
                batch = next(it)
                data_batch = tree.map_structure(
                    lambda x: (
                        strategy.experimental_local_results(x)[0]
                        if isinstance(x, tf.distribute.DistributedValues)
                        else x
                    ),
                    batch,
                )
                break
            iterator = None
        return original_build(self, iterator=iterator, data_batch=data_batch)

    def reduce_per_replica(values: Any, strategy: Any, reduction: str) -> Any:
        if reduction not in ("auto", "mean") or not multi_worker(strategy):
            return original_reduce(values, strategy, reduction)
        if isinstance(strategy, tf.distribute.TPUStrategy):
            return original_reduce(values, strategy, reduction)

        def _reduce(v: Any) -> Any:
            local = strategy.experimental_local_results(v)[0] if hasattr(v, "values") else v
            rank = getattr(getattr(local, "shape", None), "rank", None)
            return strategy.reduce("MEAN", v, axis=0 if rank else None)

        return tree.map_structure(_reduce, values)

    _originals.update(build=original_build, reduce=original_reduce)
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = reduce_per_replica
    _applied = True
    return True


def remove() -> None:
    """Put Keras's own functions back (idempotent).

    The patches are process-wide and stay for the strategy's life: `fit`'s
    first step needs them before any callback runs, and they act only under a
    multi-worker strategy. Call this when no multi-worker `fit` follows.
    """
    global _applied
    if not _applied:
        return
    from keras.src.backend.tensorflow import trainer as tf_trainer

    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _originals.pop("build")
    tf_trainer.reduce_per_replica = _originals.pop("reduce")
    _applied = False
