"""`gate_weight`: the expert's mean gate weight over all calibration tokens.

`s_j = (1/N) Σ_x g_j(x)`, with `g_j(x)` the weight the family's router gives expert j on token x after its
top-k selection and any renormalisation (0 when j is not among the top k): the "soft counting" of Muzio et
al. 2024, "SEER-MoE: Sparse Expert Efficiency through Regularization for Mixture-of-Experts"
(arXiv:2404.05089). Unlike `frequency`, an expert picked often but with a small weight scores low.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS
from .base import Criterion, ScoringContext, routing_of
from .registry import register_criterion


@register_criterion
class GateWeightCriterion(Criterion):
    name = "gate_weight"
    requires = frozenset({"routing"})
    kinds = EXPERT_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        routing = routing_of(context, groups, reads="gate")
        return routing.gate[[g.index for g in groups]] / max(routing.tokens, 1)
