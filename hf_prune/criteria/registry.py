"""Criterion name → class. Adding a criterion is adding one decorated file."""

from __future__ import annotations

from ..plugins import Registry
from .base import Criterion

_CRITERIA: Registry[Criterion] = Registry("criterion")
register_criterion = _CRITERIA.register
available_criteria = _CRITERIA.names


def get_criterion(name: str, seed: int = 0) -> Criterion:
    return _CRITERIA[name](seed=seed)
