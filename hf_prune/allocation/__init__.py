"""Scores → what to keep, and how removals spread over layers: one file per allocation.

`resolve_counts` turns a config's amounts or budget into per-layer counts and validates them
against the model's shapes (cheap, before any calibration); `build_plan` removes the lowest-scored
blocks, asks the config's allocation how many heads and neurons each layer gives up, then removes
the lowest-scored ones. Adding an allocation is adding one decorated file here.
"""

from ..plugins import import_plugins
from .base import Allocation, Counts, LayerScores, group_scores
from .counts import Budget, RemovalCounts, resolve_counts
from .planning import build_plan, plan_for, plan_layer, remove_blocks
from .registry import available_allocations, get_allocation, register_allocation

_INFRASTRUCTURE = {"base", "costs", "planning", "ranking", "registry", "counts"}
import_plugins(__name__, __path__, _INFRASTRUCTURE)

__all__ = [
    "Allocation",
    "Budget",
    "Counts",
    "LayerScores",
    "RemovalCounts",
    "available_allocations",
    "build_plan",
    "get_allocation",
    "group_scores",
    "plan_for",
    "plan_layer",
    "register_allocation",
    "remove_blocks",
    "resolve_counts",
]
