"""Engine adapters, imported as `ft.strategies`."""

from __future__ import annotations
