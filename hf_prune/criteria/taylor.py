"""First-order Taylor (Molchanov et al. 2019): `S_g = |Σ_{i∈g} G_i w_i|`, with `G` the gradient
of the calibration loss summed over all batches: the predicted loss change when the group's
weights go to zero. One backward pass per calibration batch.

Method notes and sources: docs/methods.md §3.7.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from .base import Criterion, ScoringContext, group_tensors
from .registry import register_criterion


def gradient_slices(context: ScoringContext, group: Group, source: dict) -> list[torch.Tensor]:
    """The group's slices of an accumulated gradient tensor (same layout as the weights)."""
    return [
        source[(group.layer, piece.parameter)].narrow(piece.dim, piece.start, piece.stop - piece.start)
        for piece in group.slices
    ]


@register_criterion
class TaylorCriterion(Criterion):
    name = "taylor"
    requires = frozenset({"gradients"})

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        gradients = context.statistics.gradient_sum
        return torch.stack(
            [
                sum(
                    (g * w.double()).sum()
                    for g, w in zip(gradient_slices(context, group, gradients), group_tensors(context, group))
                ).abs()
                for group in groups
            ]
        )
