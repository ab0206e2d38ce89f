"""Dependency groups: one file per architecture family, each registering an adapter."""

import importlib
import pkgutil

from .base import ArchitectureAdapter, AttentionGeometry, Branch, Group, GroupKind, LayerGeometry, RemovedBranch, TensorSlice
from .registry import get_adapter, register_adapter, supported_model_types

_INFRASTRUCTURE = {"base", "registry"}
for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ArchitectureAdapter",
    "AttentionGeometry",
    "Branch",
    "Group",
    "GroupKind",
    "LayerGeometry",
    "RemovedBranch",
    "TensorSlice",
    "get_adapter",
    "register_adapter",
    "supported_model_types",
]
