"""Allocation name → class. Adding an allocation is adding one decorated file."""

from __future__ import annotations

from ..plugins import Registry
from .base import Allocation

_ALLOCATIONS: Registry[Allocation] = Registry("allocation")
register_allocation = _ALLOCATIONS.register
available_allocations = _ALLOCATIONS.names


def get_allocation(name: str) -> Allocation:
    return _ALLOCATIONS[name]()
