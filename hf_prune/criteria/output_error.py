"""`output_error`: how much the MoE layer's output changes when the expert is removed (OBS-style, on the output).

`s_j = (1/N) Σ_x ‖y(x) − y₋ⱼ(x)‖²` over the N calibration tokens, with `y(x) = Σ_{i ∈ topk(x)} g_i(x) f_i(x)`
the layer's routed output and `y₋ⱼ(x)` what the layer computes once expert j is gone: the router run again
without j's row, so its own top-k re-selects among the other experts and, where the family renormalises,
spreads the weight over them (`calibration.statistics.removal_errors`, the masking reference's semantics).
For a softmax top-k router with renormalisation (Mixtral, Qwen3-MoE, GPT-OSS, GraniteMoE) only the tokens
routed to j change: there the (k+1)-th best expert moves into the top-k, and
`y₋ⱼ = Σ_{i ∈ topk(x) \\ j ∪ (k+1)} p_i f_i / Σ_{same} p_i`. The enumeration of expert-removal output loss of
Lu et al. 2024, "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts Large
Language Models" (arXiv:2402.14800), one expert at a time, as an OBS-style saliency (Hassibi & Stork 1992)
without the weight update; REAP (Lasby et al. 2025, arXiv:2510.13999) scores the same loss by its first term
`g_j‖f_j‖` averaged over the routed tokens only.

Cost (`expert_removal`, on top of the pairs `reap` reads): one more expert pair per token (the expert that
moves in: 1/k more expert compute) and the router re-run on each (token, chosen expert), k router calls per
token (routers that do not renormalise: every token, E calls). `output_error_first_order` needs neither.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS
from .base import Criterion, ScoringContext, routing_of
from .registry import register_criterion


@register_criterion
class OutputErrorCriterion(Criterion):
    name = "output_error"
    requires = frozenset({"routing", "expert_removal"})
    kinds = EXPERT_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        routing = routing_of(context, groups, reads="removal_error")
        return routing.removal_error[[g.index for g in groups]] / max(routing.tokens, 1)
