"""Block influence (ShortGPT; Men et al. 2024): `BI = E_tokens[1 − cos(h_in, h_out)]`.

A layer (or branch) whose output points where its input did changes the residual stream
little and can go. Measured in the calibration pass by hooks, for layers and both branches.

Method notes and sources: docs/methods.md §3.10.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import BLOCK_KINDS
from .base import Criterion, ScoringContext
from .registry import register_criterion

_KEY = {"layers": "layer", "attention_branches": "attention", "mlp_branches": "mlp"}


@register_criterion
class BlockInfluenceCriterion(Criterion):
    name = "block_influence"
    requires = frozenset({"influence"})
    kinds = BLOCK_KINDS

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        return torch.tensor(
            [context.statistics.influence[(g.layer, _KEY[g.kind])] for g in groups], dtype=torch.float64
        )
