"""Dependency groups: one file per architecture family, each registering an adapter."""

from ..plugins import import_plugins
from .base import (
    ArchitectureAdapter,
    AttentionGeometry,
    Branch,
    Group,
    GroupKind,
    LayerGeometry,
    RemovedBranch,
    TensorSlice,
)
from .registry import get_adapter, register_adapter, supported_model_types

_INFRASTRUCTURE = {"base", "experts", "registry", "slices"}
import_plugins(__name__, __path__, _INFRASTRUCTURE)

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
