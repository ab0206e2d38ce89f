"""Structured OBS (Hassibi & Stork 1992; structured as in ZipLM, Kurtic et al. 2023).

Removing the input channels `R` of a consumer `W` and refitting the others optimally on the
calibration inputs costs `ΔE_R = tr(W_R ([G⁻¹]_RR)⁻¹ W_Rᵀ)`, with `G` the (damped) Gram matrix of
the consumer's input. Groups are removed greedily, cheapest first, updating `W` and `G⁻¹` after
each removal as OBS prescribes; a group's score is the accumulated error when it went. This
ranks groups by what is lost *after* the least-squares repair, so it pairs with
`reconstruct="lstsq"`. Neurons are removed in chunks of ~1% per step to bound the cost.

Method notes and sources: docs/methods.md §3.6.
"""

from collections.abc import Sequence

import torch

from ..groups import Group
from ..kinds import CHANNEL_KINDS, DAMPING
from .base import Criterion, ScoringContext, branch_of, consumer_weight
from .registry import register_criterion

#: Compact the working matrices once the alive channels fall to this fraction of their width.
COMPACT_AT = 0.75


def damped_inverse(gram: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    regularised = gram + damping * gram.diagonal().mean() * torch.eye(
        gram.shape[0], dtype=gram.dtype, device=gram.device
    )
    return torch.linalg.inv(regularised)


def greedy_removal_scores(
    weight: torch.Tensor, gram: torch.Tensor, blocks: list[torch.Tensor], chunk: int, damping: float = DAMPING
) -> torch.Tensor:
    """OBS greedy over channel `blocks` (index tensors); returns one score per block.

    `W` and `G⁻¹` are updated in place, one rank-k `addmm_` per step. Rows and columns of removed
    channels are never read again, so both are compacted to the alive channels whenever those fall
    to `COMPACT_AT` of the current width: the steps work on shrinking matrices (about 2.7× faster
    than updating the full ones for SmolLM2's 1536 neurons; same scores up to rounding).
    """
    inverse, weight = damped_inverse(gram, damping), weight.clone()
    positions = list(blocks)  # per block: its channels' columns in the current, compacted matrices
    alive = list(range(len(blocks)))
    width = weight.shape[1]
    scores = torch.zeros(len(blocks), dtype=torch.float64)
    accumulated = 0.0
    single = all(len(block) == 1 for block in blocks)
    while alive:
        if single:  # vectorised: ‖W[:, j]‖² / [G⁻¹]_jj
            channels = torch.cat([positions[b] for b in alive])
            costs = weight[:, channels].pow(2).sum(0) / inverse.diagonal()[channels]
        else:
            costs = torch.stack([_block_cost(weight, inverse, positions[b]) for b in alive])
        order = torch.argsort(costs, stable=True)[: max(1, min(chunk, len(alive) - 1)) if len(alive) > 1 else 1]
        chosen = [alive[i] for i in order.tolist()]
        for position, b in zip(order.tolist(), chosen):
            scores[b] = accumulated + costs[position].item()
        accumulated += costs[order].sum().item()
        gone = set(chosen)
        alive = [b for b in alive if b not in gone]
        if not alive:
            break
        removed = torch.cat([positions[b] for b in chosen])
        step = torch.linalg.inv(inverse[removed][:, removed]) @ inverse[removed]
        weight.addmm_(weight[:, removed], step, alpha=-1)
        inverse.addmm_(inverse[:, removed], step, alpha=-1)
        remaining = sum(len(positions[b]) for b in alive)
        if remaining <= COMPACT_AT * width:
            kept = torch.cat([positions[b] for b in alive])
            weight, inverse = weight[:, kept], inverse[kept][:, kept]
            columns = torch.arange(remaining).split([len(positions[b]) for b in alive])
            for b, column in zip(alive, columns):
                positions[b] = column
            width = remaining
    return scores


def _block_cost(weight: torch.Tensor, inverse: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`tr(W_R ([G⁻¹]_RR)⁻¹ W_Rᵀ)`: the error of removing the channels `columns` and refitting."""
    block = weight[:, columns]
    return torch.trace(block @ torch.linalg.solve(inverse[columns][:, columns], block.T))


@register_criterion
class OBSCriterion(Criterion):
    name = "obs"
    requires = frozenset({"moments", "mlp_gram"})
    kinds = CHANNEL_KINDS

    @torch.no_grad()
    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        index, branch = groups[0].layer, branch_of(groups[0].kind)
        stats = context.statistics.consumers[(index, branch)]
        weight = consumer_weight(context, index, branch).double()
        blocks = [torch.cat([torch.arange(p.start, p.stop) for p in group.slices if p.consumer]) for group in groups]
        chunk = max(1, len(groups) // 100) if groups[0].kind in ("neurons", "channels") else 1
        return greedy_removal_scores(weight, stats.gram / stats.count, blocks, chunk, context.damping)
