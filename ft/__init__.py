"""ft: fault tolerance for distributed Keras 3 training.

`import ft` imports neither Keras, TensorFlow nor JAX: `ft.BackupAndRestore`
imports Keras when first used, and `ft.strategies` imports an engine only
when one of its adapters is used.
"""

from __future__ import annotations

import importlib.util
import os
import sys

__all__ = ["PREEMPTED_EXIT_CODE", "BackupAndRestore", "errors", "strategies"]
__version__ = "0.1.0"


def _map_source_strategies() -> None:
    # The design card keeps the engine adapters in the top-level `strategies/`
    # folder. An installed ft carries them as `ft/strategies` (pyproject's
    # package-dir); a source checkout on sys.path maps the folder here.
    if "ft.strategies" in sys.modules or importlib.util.find_spec("ft.strategies"):
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "strategies")
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(
        "ft.strategies", init, submodule_search_locations=[folder]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ft.strategies"] = module
    spec.loader.exec_module(module)


_map_source_strategies()

from typing import TYPE_CHECKING, Any

from ft import (
    errors,
    strategies,  # type: ignore[attr-defined]
)
from ft.preemption import PREEMPTED_EXIT_CODE

if TYPE_CHECKING:
    from ft.backup_and_restore import BackupAndRestore


def __getattr__(name: str) -> Any:
    # Keras (and with it an engine) is imported on first use of the callback,
    # so `python -m ft.launch` and `python -m ft inspect` start in a blink.
    if name == "BackupAndRestore":
        from ft.backup_and_restore import BackupAndRestore

        return BackupAndRestore
    raise AttributeError(f"module 'ft' has no attribute {name!r}")
