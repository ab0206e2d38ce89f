"""Random: uniform scores from a seeded generator. The floor every criterion must beat."""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS, STAGE_KINDS
from .base import ALL_KINDS, Criterion, ScoringContext
from .registry import register_criterion


@register_criterion
class RandomCriterion(Criterion):
    name = "random"
    kinds = ALL_KINDS | STAGE_KINDS | EXPERT_KINDS

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._generator = torch.Generator().manual_seed(seed)

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        return torch.rand(len(groups), generator=self._generator, dtype=torch.float64)
