"""Restore destinations: TensorFlow tensors read into in place, checked, or numpy."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ft import host_buffers, log

tf = pytest.importorskip("tensorflow")


@pytest.mark.parametrize("dtype", ["float32", "int64", "bfloat16", "bool"])
def test_a_tensorflow_destination_is_the_tensors_own_memory(dtype: str) -> None:
    np_dtype = np.dtype(tf.as_dtype(dtype).as_numpy_dtype)
    view, tensor = host_buffers.tensorflow_tensor((3, 5), np_dtype)
    assert isinstance(tensor, tf.Tensor) and tuple(tensor.shape) == (3, 5)
    values = (np.arange(15).reshape(3, 5) % 2).astype(np_dtype)
    view[...] = values
    # What TensorFlow computes from the tensor is what was written through the view.
    np.testing.assert_array_equal(tf.identity(tensor).numpy(), values)
    variable = tf.Variable(tf.zeros((3, 5), tf.as_dtype(dtype)))
    variable.assign(tensor)
    np.testing.assert_array_equal(variable.numpy(), values)


def test_a_scalar_goes_through_numpy() -> None:
    view, value = host_buffers.tensorflow_tensor((), np.dtype("int64"))
    assert isinstance(value, np.ndarray) and value is view and value.shape == ()


def test_numpy_buffers_are_aligned() -> None:
    for shape in [(7,), (3, 129), ()]:
        array, same = host_buffers.aligned(shape, np.dtype("float32"))
        assert array is same and array.shape == shape
        assert array.ctypes.data % host_buffers.ALIGN == 0


def test_where_the_view_is_a_copy_numpy_buffers_are_used_and_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A TensorFlow whose `_numpy()` hands out a copy, not the tensor's memory.
    monkeypatch.setattr(host_buffers, "_shared_views", {})
    monkeypatch.setattr(log, "_said", set())  # said once per process
    real_view = host_buffers._view
    monkeypatch.setattr(
        host_buffers, "_view", lambda tensor: None if (v := real_view(tensor)) is None else v.copy()
    )
    ft_logger = logging.getLogger("ft")
    ft_logger.addHandler(caplog.handler)  # ft's logger does not propagate to the root
    try:
        first, value = host_buffers.tensorflow_tensor((4,), np.dtype("float32"))
        host_buffers.tensorflow_tensor((4,), np.dtype("float64"))
    finally:
        ft_logger.removeHandler(caplog.handler)
    assert isinstance(value, np.ndarray) and value is first
    said = [r for r in caplog.records if "does not share the tensor's memory" in r.getMessage()]
    assert len(said) == 1 and tf.__version__ in said[0].getMessage()
