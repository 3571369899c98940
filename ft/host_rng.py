"""The host random state that decides the order of the input's batches, as JSON.

Runs on every process. Three generators are captured and restored together:
NumPy's global one (Keras shuffles NumPy arrays with it on JAX), Python's
`random` (Keras's `PyDataset` adapter shuffles batch indices with it), and
Keras's global `SeedGenerator` (used by `keras.random` calls made without a
seed, e.g. in a `PyDataset`). Backend seed state that lives in the model
(Dropout's seed generators) is saved with the model's variables instead.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np


def capture() -> dict[str, Any]:
    """The current host random state, as a JSON-ready dict."""
    return {"numpy": _numpy_state(), "python": _python_state(), "keras": _keras_state()}


def restore(state: dict[str, Any]) -> None:
    """Set the host random state to `state` (from `capture`).

    A record written by an older ft holds NumPy's state alone; it is
    restored as such and the other generators are left as they are.
    """
    if "bit_generator" in state:  # ft <= 0.1: NumPy's state alone
        _set_numpy_state(state)
        return
    _set_numpy_state(state["numpy"])
    _set_python_state(state["python"])
    _set_keras_state(state.get("keras"))


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    return {
        "bit_generator": str(name),
        "keys": [int(k) for k in keys],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state(
        (
            state["bit_generator"],
            np.asarray(state["keys"], dtype=np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached_gaussian"],
        )
    )


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "internal": [int(i) for i in internal], "gauss": gauss_next}


def _set_python_state(state: dict[str, Any]) -> None:
    random.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def _keras_state() -> dict[str, Any] | None:
    """The state of Keras's global `SeedGenerator`, or None if it was never created."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    generator = global_state.get_global_attribute(_global_generator_key(seed_generator))
    if generator is None:
        return None
    value = np.array(_to_numpy(generator.state.value))
    return {"dtype": str(value.dtype), "value": value.tolist()}


def _set_keras_state(state: dict[str, Any] | None) -> None:
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    if state is None:
        # As in a fresh process: Keras creates it from the global seed on first use.
        global_state.set_global_attribute(_global_generator_key(seed_generator), None)
        return
    generator = seed_generator.global_seed_generator()
    generator.state.assign(np.asarray(state["value"], dtype=state["dtype"]))


def _global_generator_key(seed_generator: Any) -> str:
    # Keras < 3.11 spells the key out.
    return str(getattr(seed_generator, "GLOBAL_SEED_GENERATOR", "global_seed_generator"))


def _to_numpy(value: Any) -> np.ndarray:
    from keras import ops

    return np.asarray(ops.convert_to_numpy(value))
