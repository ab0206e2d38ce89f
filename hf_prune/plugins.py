"""One file per method: a name → class registry, and the import that fills it.

Criteria, allocations and architecture adapters are each a folder whose files register a class
when imported; the folder's `__init__` imports them all, so adding one is adding one file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by their `name` attribute; `what` names the concept in errors."""

    def __init__(self, what: str):
        self.what = what
        self._classes: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator."""
        name = cls.name  # type: ignore[attr-defined]
        if name in self._classes:
            raise ValueError(f"{self.what} {name!r} is already registered by {self._classes[name].__name__}")
        self._classes[name] = cls
        return cls

    def names(self) -> list[str]:
        return sorted(self._classes)

    def __getitem__(self, name: str) -> type[T]:
        return self._classes[name]


def import_plugins(package: str, path: Iterable[str], infrastructure: set[str]) -> None:
    """Import every module of `package` but its `infrastructure`, so each registers itself."""
    for module in pkgutil.iter_modules(path):
        if module.name not in infrastructure:
            importlib.import_module(f"{package}.{module.name}")
