"""`uniform`: the same count in every (unprotected) layer, so a standard config fits.

Method notes and sources: docs/methods.md §5.2.
"""

from __future__ import annotations

from ..plan import PruningPlan
from .base import Allocation, Counts, LayerScores
from .counts import RemovalCounts
from .registry import register_allocation


@register_allocation
class UniformAllocation(Allocation):
    name = "uniform"

    def counts(self, scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> Counts:
        return removal.counts
