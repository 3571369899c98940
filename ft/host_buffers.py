"""Host buffers a restore reads into, owned by the engine that takes them.

Called by the restoring process (every process), from `ft.store.tensorstore_reads`.

A restore reads every array into host memory and hands it to the engine. JAX
on the CPU takes a 64-byte aligned numpy buffer as it is. TensorFlow copies a
numpy array into a tensor of its own (`tf.convert_to_tensor`: about 0.06 s per
0.26 GB on 2 cores), but its `Variable.assign` of a tensor takes that tensor's
buffer without a copy. So under TensorFlow the read goes straight into an
uninitialised TensorFlow tensor (`tf.raw_ops.Empty(init=False)`), through the
numpy array that `EagerTensor._numpy()` returns over the tensor's own memory.

That `_numpy()` shares the tensor's memory is a TensorFlow internal: it is
checked once per process and dtype (values written through the array must be
what TensorFlow then computes with). Where it does not hold, the restore
reads into numpy buffers and lets TensorFlow copy them, and says so once in
the log, naming the TensorFlow version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from ft import log

# JAX's CPU client and TensorFlow use a host buffer in place from this alignment.
ALIGN = 64

# A destination: the array the read writes into, and what the engine is handed.
Allocate = Callable[[tuple[int, ...], np.dtype], tuple[np.ndarray, Any]]

_shared_views: dict[str, bool] = {}  # numpy dtype name -> TF's view shares memory


def aligned(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """An uninitialised numpy array whose data starts on an `ALIGN`-byte
    boundary, for both roles."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    array = raw[start : start + nbytes].view(dtype).reshape(shape)
    return array, array


def for_backend() -> Allocate:
    """Destinations for the Keras backend in use: TensorFlow tensors, else numpy."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return tensorflow_tensor
    return aligned


def tensorflow_tensor(shape: tuple[int, ...], dtype: np.dtype) -> tuple[np.ndarray, Any]:
    """An uninitialised TensorFlow tensor and a numpy array over its memory.

    Falls back to `aligned` (TensorFlow then copies at `assign`) for a scalar,
    whose view is a copy, and where TensorFlow's view is not its memory.
    """
    import tensorflow as tf

    if not shape or not _view_is_shared(tf, dtype):
        return aligned(shape, dtype)
    with tf.device("CPU:0"):  # host memory, wherever the variables live
        tensor = tf.raw_ops.Empty(shape=shape, dtype=tf.as_dtype(dtype), init=False)
    view = _view(tensor)
    if view is None or view.shape != shape or view.dtype != dtype:
        return aligned(shape, dtype)
    return view, tensor


def _view(tensor: Any) -> np.ndarray | None:
    numpy_of = getattr(tensor, "_numpy", None)
    if numpy_of is None:
        return None
    view = numpy_of()
    if not isinstance(view, np.ndarray) or not view.flags.writeable:
        return None
    return view


def _view_is_shared(tf: Any, dtype: np.dtype) -> bool:
    """Whether values written into `_numpy()`'s array are the tensor's. Once per dtype."""
    key = np.dtype(dtype).name
    if key not in _shared_views:
        shared = False
        with tf.device("CPU:0"):
            tensor = tf.raw_ops.Empty(shape=[2], dtype=tf.as_dtype(dtype), init=True)
        view = _view(tensor)
        if view is not None and view.shape == (2,):
            view[...] = np.array([1, 1], dtype=np.int8).astype(dtype)
            # Computed by TensorFlow from its own buffer.
            shared = float(tf.reduce_sum(tf.cast(tensor, tf.float64))) == 2.0
        _shared_views[key] = shared
        if not shared:
            log.say_once(
                "tf-view-is-a-copy",
                logging.INFO,
                "TensorFlow %s: EagerTensor._numpy() does not share the tensor's memory "
                "(dtype %s); restores read into numpy buffers and TensorFlow copies them",
                tf.__version__,
                key,
            )
    return _shared_views[key]
