"""Allocation name → class. Adding an allocation is adding one decorated file."""

from __future__ import annotations

from .base import Allocation

_ALLOCATIONS: dict[str, type[Allocation]] = {}


def register_allocation(cls: type[Allocation]) -> type[Allocation]:
    if cls.name in _ALLOCATIONS:
        raise ValueError(f"allocation {cls.name!r} is already registered by {_ALLOCATIONS[cls.name].__name__}")
    _ALLOCATIONS[cls.name] = cls
    return cls


def available_allocations() -> list[str]:
    return sorted(_ALLOCATIONS)


def get_allocation(name: str) -> Allocation:
    return _ALLOCATIONS[name]()
