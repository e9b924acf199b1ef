"""A package's names imported on first use (its `_LAZY` table: name -> module), so that importing the package, or the
`spectra` command line, does not import torch and every reader behind it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, names: dict[str, str]) -> Callable[[str], Any]:
    """The module `__getattr__` of `package` that imports `names[name]` when `name` is first asked for."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
