"""A package's names imported on first use (its `_LAZY` table: name -> module), so that importing the package, or the
`spectra` command line, does not import torch and every reader behind it."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any


class _LazyPackage(ModuleType):
    """A package module whose `_LAZY` names are imported when first asked for. A name that is also a submodule's
    (`spectra.eval.perplexity`, the function and its module) gives the name's object, not the submodule that the
    import system binds under it once the submodule is imported, as the eager `from ... import` it replaces did."""

    def __getattr__(self, name: str) -> Any:  # a name not bound yet
        names = ModuleType.__getattribute__(self, "_LAZY")
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            ModuleType.__setattr__(self, name, value)
            return value
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __getattribute__(self, name: str) -> Any:
        value = ModuleType.__getattribute__(self, name)
        if isinstance(value, ModuleType) and not name.startswith("__"):
            names = ModuleType.__getattribute__(self, "_LAZY")
            if name in names and value.__name__ == names[name]:  # the submodule bound over the lazy name
                value = getattr(value, name)
                ModuleType.__setattr__(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        return sorted(set(ModuleType.__dir__(self)) | set(ModuleType.__getattribute__(self, "_LAZY")))


def lazy_package(name: str) -> None:
    """Make the package `name` (whose module defines `_LAZY`) import its `_LAZY` names on first use."""
    sys.modules[name].__class__ = _LazyPackage
