"""Activation (structured Wanda, "Wanda-sp"; Sun et al. 2023, An et al. 2024):
`S_g = Σ_{j∈g} ‖X_j‖₂ · Σ_i |W_ij|`, with `X_j` the consumer's input channel j over the
calibration tokens and `W` the consuming projection (`o_proj`, `down_proj`).

A channel matters when it is both large on real data and read by large weights. A stream channel
(`stage_channels`), read by every block of its stage, is scored by its mean |value| at the stage's
output over the calibration images (`CalibrationStatistics.streams`).

Method notes and sources: docs/methods.md §3.3.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import CHANNEL_KINDS, STAGE_KINDS
from .base import Criterion, ScoringContext, channel_score
from .registry import register_criterion


@register_criterion
class ActivationCriterion(Criterion):
    name = "activation"
    requires = frozenset({"moments"})
    kinds = CHANNEL_KINDS | STAGE_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        if groups[0].kind in STAGE_KINDS:
            mean_magnitude = context.statistics.streams[groups[0].layer].mean
            return torch.stack([mean_magnitude[group.index] for group in groups])
        return channel_score(context, groups, lambda w, s: s.squares.sqrt() * w.abs().sum(0))
