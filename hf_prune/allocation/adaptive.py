"""`adaptive`: FLAP's adaptive structure search (An et al. 2024). Scores are standardised within
each layer and kind (z-scores), then heads and neurons of all layers are ranked together and
removed weakest first, each weighted by what it costs, until the uniform plan's budget (in
parameters, or FLOPs for `target_flops`) is spent: layers and modules that matter less give up more.

Method notes and sources: docs/methods.md §5.4.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidPruningTargetError
from ..plan import PruningPlan
from .base import Allocation, Counts, LayerScores
from .counts import RemovalCounts
from .ranking import (
    attention_candidates,
    attention_counts,
    head_slot_candidates,
    neuron_candidates,
    rounded,
    spend,
    standardised,
    uniform_cost,
)
from .registry import register_allocation

if TYPE_CHECKING:
    from ..config import PruningConfig


@register_allocation
class AdaptiveAllocation(Allocation):
    name = "adaptive"

    def validate(self, config: PruningConfig) -> None:
        if config.kv_groups and config.attention_heads:
            raise InvalidPruningTargetError(
                "allocation='adaptive' ranks one kind of attention unit against the neurons; set kv_groups or "
                "attention_heads, not both (or use allocation='global')."
            )

    def counts(self, scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> Counts:
        uniform = removal.counts
        pools, budget = {}, 0.0
        attention_uniform = {**uniform.kv_groups, **uniform.mha_heads}
        if any(attention_uniform.values()):
            pools["attention"] = attention_candidates(scores, plan, removal)
            budget += uniform_cost(pools["attention"], attention_uniform)
        if any(uniform.heads_per_group.values()):
            pools["heads"] = head_slot_candidates(scores, plan, removal, Counts())
            budget += uniform_cost(pools["heads"], uniform.heads_per_group)
        if any(uniform.neurons.values()):
            pools["neurons"] = neuron_candidates(scores, plan, removal)
            budget += uniform_cost(pools["neurons"], uniform.neurons)
        taken = spend(pools, budget, standardised)
        counts = attention_counts(plan, taken.get("attention", {}))
        counts.heads_per_group = taken.get("heads", {})
        counts.neurons = rounded(plan, taken.get("neurons", {}), removal.round_to)
        return counts
