"""What a backup holds about the model: the variables, their manifest, restore targets.

Runs on every process. Backend-neutral: variables are Keras variables, values
are copied for a backup by `ft.snapshot`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ft import errors

# The groups of variables a backup holds, in the order they are saved.
# `model` is every model variable, trainable or not (BatchNorm statistics and
# seed generator states included); `optimizer` includes `iterations`;
# `metrics` lets a mid-epoch resume report the same epoch logs.
GROUPS = ("model", "optimizer", "metrics")

# Auto-generated Keras names carry a per-process counter ("dense_3"): a model
# rebuilt in a fresh process, or a second model in the same one, gets other
# numbers for the same architecture, so paths are compared without them.
_AUTO_SUFFIX = re.compile(r"_\d+(?=$|/|_)")


@dataclass(frozen=True)
class VariableSpec:
    """Path, shape and dtype of one saved variable."""

    path: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VariableSpec:
        return cls(str(data["path"]), tuple(int(d) for d in data["shape"]), str(data["dtype"]))

    def matches(self, other: VariableSpec) -> bool:
        return (
            normalized_path(self.path) == normalized_path(other.path)
            and self.shape == other.shape
            and self.dtype == other.dtype
        )


def normalized_path(path: str) -> str:
    """`path` without Keras's auto-numbering suffixes (`dense_2` -> `dense`)."""
    return _AUTO_SUFFIX.sub("", path)


def live_variables(model: Any) -> dict[str, list[Any]]:
    """The variables of `model` grouped as a backup stores them.

    Call on every process. The optimizer must already be built.
    """
    optimizer = getattr(model, "optimizer", None)
    return {
        "model": list(model.trainable_variables) + list(model.non_trainable_variables),
        "optimizer": list(optimizer.variables) if optimizer is not None else [],
        "metrics": list(model.metrics_variables),
    }


def wait_for_device(model: Any) -> None:
    """Return once the device has run every step dispatched so far (JAX; TensorFlow's
    `fit` already waits for each step's logs). Training thread."""
    import keras

    if keras.backend.backend() != "jax":
        return
    import jax

    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        jax.block_until_ready(optimizer.iterations.value)


def _spec(variable: Any) -> VariableSpec:
    from keras import backend

    return VariableSpec(
        path=str(variable.path),
        shape=tuple(int(d) for d in variable.shape),
        dtype=backend.standardize_dtype(variable.dtype),
    )


def manifest(variables: dict[str, list[Any]]) -> dict[str, list[VariableSpec]]:
    """The specs of `variables`, group by group."""
    return {group: [_spec(v) for v in variables[group]] for group in GROUPS}


def manifest_to_json(specs: dict[str, list[VariableSpec]]) -> dict[str, Any]:
    return {group: [s.to_json() for s in specs[group]] for group in GROUPS}


def manifest_from_json(data: dict[str, Any]) -> dict[str, list[VariableSpec]]:
    return {group: [VariableSpec.from_json(d) for d in data.get(group, [])] for group in GROUPS}


def live_values(variables: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """The live value of every variable, grouped: for a JAX multi-host save, where
    every process writes its own shards of the global arrays before training goes
    on. Other saves take a private copy with `ft.snapshot.Snapshotter`."""
    return {group: [v.value for v in variables[group]] for group in GROUPS}


def nbytes(arrays: dict[str, list[Any]]) -> int:
    """Total bytes of a snapshot."""
    return sum(int(getattr(a, "nbytes", 0)) for group in arrays.values() for a in group)


def restore_target(
    variables: dict[str, list[Any]], saved: dict[str, list[VariableSpec]]
) -> dict[str, list[Any]]:
    """What Orbax should restore each saved array as.

    Under JAX, arrays land directly on the live variables' shardings (Orbax
    reshards when the backup was written by another topology); elsewhere, and
    for saved variables the model no longer has, as host numpy arrays.
    """
    import keras

    target: dict[str, list[Any]] = {}
    for group in GROUPS:
        live = variables[group]
        same = first_mismatch(saved[group], [_spec(v) for v in live]) is None
        if keras.backend.backend() == "jax" and same:
            import jax

            target[group] = [
                jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=v.value.sharding)
                for s, v in zip(saved[group], live, strict=True)
            ]
        else:
            # Only their shape and dtype are read: a zero-strided view of one
            # element, not an allocation of the whole state.
            target[group] = [
                np.broadcast_to(np.zeros((), dtype=s.dtype), s.shape) for s in saved[group]
            ]
    return target


def first_mismatch(
    saved: list[VariableSpec], live: list[VariableSpec]
) -> tuple[int, VariableSpec | None, VariableSpec | None] | None:
    """The first position where two variable lists differ, or None if they match."""
    for index in range(max(len(saved), len(live))):
        s = saved[index] if index < len(saved) else None
        v = live[index] if index < len(live) else None
        if s is None or v is None or not s.matches(v):
            return index, s, v
    return None


def check_compatible(
    saved: dict[str, list[VariableSpec]],
    live: dict[str, list[VariableSpec]],
    where: str,
    groups: tuple[str, ...] = ("model", "optimizer"),
) -> None:
    """Raise `IncompatibleCheckpointError` unless `saved` fits `live` in `groups`."""
    for group in groups:
        found = first_mismatch(saved[group], live[group])
        if found is None:
            continue
        index, s, v = found
        backed_up = _describe(s) if s else f"nothing (the backup has {len(saved[group])})"
        current = _describe(v) if v else f"nothing (the model has {len(live[group])})"
        raise errors.IncompatibleCheckpointError(
            f"The backup in {where} was written by a different model or optimizer. "
            f"First mismatch in the {group} variables, at position {index}: the backup "
            f"has {backed_up}, the current model has {current}. Restore with the same "
            "model, compile arguments and optimizer that wrote the backup, or point "
            "`backup_dir` at an empty directory (or delete this one) to start afresh."
        )


def _describe(spec: VariableSpec) -> str:
    return f"`{spec.path}` with shape {spec.shape} and dtype {spec.dtype}"


def assign(variables: list[Any], values: list[np.ndarray]) -> None:
    """Assign restored values to live variables, one to one."""
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)
