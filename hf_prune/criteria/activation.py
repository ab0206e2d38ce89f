"""Activation (structured Wanda, "Wanda-sp"; Sun et al. 2023, An et al. 2024):
`S_g = Σ_{j∈g} ‖X_j‖₂ · Σ_i |W_ij|`, with `X_j` the consumer's input channel j over the
calibration tokens and `W` the consuming projection (`o_proj`, `down_proj`).

A channel matters when it is both large on real data and read by large weights.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from .base import CHANNEL_KINDS, Criterion, ScoringContext, channel_score
from .registry import register_criterion


@register_criterion
class ActivationCriterion(Criterion):
    name = "activation"
    requires = frozenset({"moments"})
    kinds = CHANNEL_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        return channel_score(context, groups, lambda w, s: s.squares.sqrt() * w.abs().sum(0))
