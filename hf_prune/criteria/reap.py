"""`reap`: router-weighted expert activation (REAP).

`s_j = (1/|X_j|) Σ_{x ∈ X_j} g_j(x)·‖f_j(x)‖₂`, over the calibration tokens `X_j` routed to expert j, with
`g_j(x)` its gate weight (after the family's top-k and renormalisation) and `f_j(x)` its output: how much the
expert adds to the layer's output when it is used. Lasby et al. 2025, "REAP: Router-weighted Expert
Activation Pruning" (arXiv:2510.13999). An expert never routed to scores 0. The expert outputs come from the
calibration pass (`expert_norms`: `calibration.statistics.ExpertPairs`), at no extra expert compute.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS
from .base import Criterion, ScoringContext, routing_of
from .registry import register_criterion


@register_criterion
class ReapCriterion(Criterion):
    name = "reap"
    requires = frozenset({"routing", "expert_norms"})
    kinds = EXPERT_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        routing = routing_of(context, groups, reads="weighted_norm")
        experts = [g.index for g in groups]
        return routing.weighted_norm[experts] / routing.selected[experts].clamp(min=1)
