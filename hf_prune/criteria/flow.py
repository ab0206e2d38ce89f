"""Information flow / output energy: `S_g = E‖W_g x_g‖² = tr(W_g G_gg W_gᵀ) / N`, with
`G = Σ x xᵀ` the Gram matrix of the consumer's input over N calibration tokens.

The share of the signal a group actually sends into the residual stream (docs/methods.md §3.5). For a
head it uses the head's whole Gram block, so correlated channels inside a head count once; for a
single neuron it is `E[x_j²] · ‖W[:, j]‖²`. A branch scores the energy of its whole output,
a layer the sum of its two branches'.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import BLOCK_KINDS
from .base import Criterion, ScoringContext, branch_of, consumer_weight
from .registry import register_criterion


def _energy(
    weight: torch.Tensor, gram: torch.Tensor | None, mean_square: torch.Tensor, start: int, stop: int, count: int
):
    w = weight[:, start:stop]
    if gram is None or stop - start == 1:
        return w.pow(2).sum(0) @ mean_square[start:stop]
    return torch.einsum("ij,jk,ik->", w, gram[start:stop, start:stop], w) / count


@register_criterion
class FlowCriterion(Criterion):
    name = "flow"
    requires = frozenset({"moments"})

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        kind, index = groups[0].kind, groups[0].layer
        branches = ("attention", "mlp") if kind == "layers" else (branch_of(kind),)
        totals = torch.zeros(len(groups), dtype=torch.float64)
        for branch in branches:
            stats = context.statistics.consumers.get((index, branch))
            if stats is None:
                continue
            weight = consumer_weight(context, index, branch).double()
            for position, group in enumerate(groups):
                pieces = (
                    [(0, weight.shape[1])]
                    if kind in BLOCK_KINDS
                    else [(p.start, p.stop) for p in group.slices if p.consumer]
                )
                for start, stop in pieces:
                    totals[position] += _energy(weight, stats.gram, stats.mean_square, start, stop, stats.count)
        return totals
