"""`output_error_first_order`: `output_error` without re-selection, from the pairs `reap` already reads.

`s_j = (1/N) Σ_{x: j ∈ topk(x)} ‖y(x) − y₋ⱼ(x)‖²` with `y₋ⱼ` the layer's output when the tokens routed to j
lose `g_j f_j` and the other chosen experts take its weight in proportion (no expert moves into the top-k):
`y₋ⱼ = (y − g_j f_j)/(1 − g_j)`, so `‖y − y₋ⱼ‖² = (g_j/(1 − g_j))²·‖f_j − y‖²`, where the token's top-k weights
sum to 1 (the family renormalises them); elsewhere, and where j carried the whole token, the plain dropped
contribution `‖g_j f_j‖²` (`calibration.statistics.first_order_errors`). The first-order form of the
expert-removal output loss of Lu et al. 2024, "Not All Experts are Equal" (arXiv:2402.14800); REAP (Lasby et
al. 2025, arXiv:2510.13999) reads the same pairs. No expert compute beyond the forward's own pairs.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS
from .base import Criterion, ScoringContext, routing_of
from .registry import register_criterion


@register_criterion
class FirstOrderOutputErrorCriterion(Criterion):
    name = "output_error_first_order"
    requires = frozenset({"routing", "expert_norms"})
    kinds = EXPERT_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        routing = routing_of(context, groups, reads="first_order_error")
        return routing.first_order_error[[g.index for g in groups]] / max(routing.tokens, 1)
