"""Magnitude: the L2 norm of every weight a group owns, `‖W_g‖₂` (data-free).

The classic baseline (Li et al. 2017 for filters; Torch-Pruning's default importance). It
ignores the data, so it fails once a weight's scale stops tracking its effect: on SmolLM2 it
takes perplexity from 29 to millions at 25% of MLP neurons. A routed expert is scored by its router row and
expert tensors. A stream channel (`stage_channels`) is
scored by the weights that write it (producers, norms, scales), not by its many readers.

Method notes and sources: docs/methods.md §3.1.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import EXPERT_KINDS, STAGE_KINDS
from .base import ALL_KINDS, Criterion, ScoringContext, group_tensors
from .registry import register_criterion


@register_criterion
class MagnitudeCriterion(Criterion):
    name = "magnitude"
    kinds = ALL_KINDS | STAGE_KINDS | EXPERT_KINDS

    @torch.no_grad()
    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        producers_only = groups[0].kind in STAGE_KINDS
        return torch.stack(
            [
                sum(t.double().pow(2).sum() for t in group_tensors(context, group, producers_only)).sqrt()
                for group in groups
            ]
        )
