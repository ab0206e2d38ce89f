"""Criterion name → class. Adding a criterion is adding one decorated file."""

from __future__ import annotations

from .base import Criterion

_CRITERIA: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    if cls.name in _CRITERIA:
        raise ValueError(f"criterion {cls.name!r} is already registered by {_CRITERIA[cls.name].__name__}")
    _CRITERIA[cls.name] = cls
    return cls


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def get_criterion(name: str, seed: int = 0) -> Criterion:
    return _CRITERIA[name](seed=seed)
