"""Fluctuation (FLAP; An et al. 2024): `S_g = Σ_{j∈g} Var(X_j) · ‖W[:, j]‖²₂`.

A channel that barely varies over the data can be replaced by its mean: FLAP removes it and
adds `W[:, j] · E[X_j]` back as a bias (`reconstruct="bias"`). What is lost is the fluctuation.

Method notes and sources: docs/methods.md §3.4.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import CHANNEL_KINDS
from .base import Criterion, ScoringContext, channel_score
from .registry import register_criterion


@register_criterion
class FluctuationCriterion(Criterion):
    name = "fluctuation"
    requires = frozenset({"moments"})
    kinds = CHANNEL_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        return channel_score(context, groups, lambda w, s: s.variance * w.pow(2).sum(0))
