"""Old public names kept for one release: each still works and warns with its new name."""

from __future__ import annotations

import warnings
from typing import Any

__all__ = ["RENAMED", "renamed"]

# old name -> new name (renamed in 0.2.0; the old names go in the release after it).
RENAMED = {"StainOD": "StainConcentrationNorm", "StainNormalized": "NormalizedNetwork"}


def renamed(name: str, namespace: dict[str, Any], module: str) -> Any:
    """``namespace[RENAMED[name]]`` with a DeprecationWarning; AttributeError for any other name."""
    new = RENAMED.get(name)
    if new is None or new not in namespace:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(f"lstainnorm: {name} is now {new}; the old name will be removed in the next release", DeprecationWarning, stacklevel=3)
    return namespace[new]
