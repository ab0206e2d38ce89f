"""Magnitude: the L2 norm of every weight a group owns, `‖W_g‖₂` (data-free).

The classic baseline (Li et al. 2017 for filters; Torch-Pruning's default importance). It
ignores the data, so it is weak once the weights' scale stops tracking their effect.
"""

from collections.abc import Sequence

import torch
from torch import nn

from ..groups import ArchitectureAdapter, Group
from .base import Criterion, group_tensors
from .registry import register_criterion


@register_criterion
class MagnitudeCriterion(Criterion):
    name = "magnitude"

    @torch.no_grad()
    def score(self, model: nn.Module, adapter: ArchitectureAdapter, groups: Sequence[Group]) -> torch.Tensor:
        return torch.tensor(
            [
                sum(t.detach().double().pow(2).sum() for t in group_tensors(model, adapter, group)) ** 0.5
                for group in groups
            ],
            dtype=torch.float64,
        )
