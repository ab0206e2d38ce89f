"""`global`: every kind removes what `uniform` would in total, spread over layers by ranking all
layers' groups together after dividing each layer's scores by their mean (scores of different
layers live on different scales; the ratio to the layer's mean does not).

Method notes and sources: docs/methods.md §5.3.
"""

from __future__ import annotations

from ..plan import PruningPlan
from .base import Allocation, Counts, LayerScores
from .counts import RemovalCounts
from .ranking import (
    attention_candidates,
    attention_counts,
    by_mean,
    head_slot_candidates,
    neuron_candidates,
    rounded,
    spend,
    uniform_cost,
)
from .registry import register_allocation


@register_allocation
class GlobalAllocation(Allocation):
    name = "global"

    def counts(self, scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> Counts:
        uniform = removal.counts
        counts = Counts()
        attention_uniform = {**uniform.kv_groups, **uniform.mha_heads}
        if any(attention_uniform.values()):
            pool = attention_candidates(scores, plan, removal)
            counts = attention_counts(plan, spend({"a": pool}, uniform_cost(pool, attention_uniform), by_mean)["a"])
        if any(uniform.heads_per_group.values()):
            pool = head_slot_candidates(scores, plan, removal, counts)
            counts.heads_per_group = spend({"h": pool}, uniform_cost(pool, uniform.heads_per_group), by_mean)["h"]
        if any(uniform.neurons.values()):
            pool = neuron_candidates(scores, plan, removal)
            removed = spend({"n": pool}, uniform_cost(pool, uniform.neurons), by_mean)["n"]
            counts.neurons = rounded(plan, removed, removal.round_to)
        return counts
