"""OBD with the empirical Fisher (LeCun et al. 1989): `S_g = ½ Σ_{i∈g} F_ii w_i²`, where the
Hessian diagonal is approximated by `F = E_batches[g²]`, the mean squared batch gradient.

Method notes and sources: docs/methods.md §3.8.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from .base import Criterion, ScoringContext, group_tensors
from .registry import register_criterion
from .taylor import gradient_slices


@register_criterion
class FisherCriterion(Criterion):
    name = "fisher"
    requires = frozenset({"gradients"})

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        squares, batches = context.statistics.gradient_squares, context.statistics.batches
        return torch.stack(
            [
                0.5
                * sum(
                    (f / batches * w.double().pow(2)).sum()
                    for f, w in zip(gradient_slices(context, group, squares), group_tensors(context, group))
                )
                for group in groups
            ]
        )
