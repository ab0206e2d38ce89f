"""`frequency`: how often the router sends a token to the expert.

`s_j = (1/N) Σ_x 1[j ∈ topk(x)]` over the N calibration tokens: the "heavy-hitters" actual counting of
Muzio et al. 2024, "SEER-MoE: Sparse Expert Efficiency through Regularization for Mixture-of-Experts"
(arXiv:2404.05089), the usual frequency baseline of expert pruning. An expert never routed to scores 0.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS
from .base import Criterion, ScoringContext, routing_of
from .registry import register_criterion


@register_criterion
class FrequencyCriterion(Criterion):
    name = "frequency"
    requires = frozenset({"routing"})
    kinds = EXPERT_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        routing = routing_of(context, groups)
        return routing.selected[[g.index for g in groups]] / max(routing.tokens, 1)
