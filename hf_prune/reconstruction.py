"""Training-free repair of the projections that consume pruned channels.

`lstsq` refits the consumer from the calibration statistics so it reproduces the dense output
from the channels that stay (METHODS.md §4): `W'_S = W G[:, S] (G[S, S] + λI)⁻¹`, with `G` the
Gram matrix of the consumer's input and `λ` a small damping. The refit is written into the kept
columns of the dense weight before surgery, so masking and surgery still agree exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from .criteria.obs import DAMPING
from .errors import InvalidPruningTargetError
from .groups import ArchitectureAdapter, Branch
from .groups.base import input_slices, matrix_view
from .plan import LayerPlan, PruningPlan
from .statistics import CalibrationStatistics



def removed_channels(adapter: ArchitectureAdapter, layer: nn.Module, plan: LayerPlan, branch: Branch) -> list[int]:
    """Input channels of the branch's consumer that the plan removes."""
    consumer = adapter.o_proj if branch == "attention" else adapter.down_proj
    return sorted(
        {
            channel
            for piece in plan.removed_slices(adapter, layer)
            if piece.consumer and piece.parameter.startswith(consumer + ".")
            for channel in range(piece.start, piece.stop)
        }
    )


def refit(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Least-squares refit of the kept columns of `weight` (outputs × channels)."""
    gram_kept = gram[kept][:, kept]
    regularised = gram_kept + damping * gram_kept.diagonal().mean() * torch.eye(len(kept), dtype=gram.dtype)
    return torch.linalg.solve(regularised, (weight @ gram[:, kept]).T).T


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    statistics: CalibrationStatistics | None,
    method: str,
) -> None:
    """Repair every consumer that loses channels, in place, before surgery."""
    if method == "none":
        return
    if statistics is None:
        raise InvalidPruningTargetError(f"reconstruct={method!r} needs calibration statistics; set calibration=...")
    layers = adapter.layers(model)
    for layer_plan in plan.layers:
        if not layer_plan.keep_layer:
            continue
        layer = layers[layer_plan.layer]
        for branch, changed in (("attention", layer_plan.changes_attention), ("mlp", layer_plan.changes_mlp)):
            if not changed:
                continue
            stats = statistics.consumers[(layer_plan.layer, branch)]
            name = adapter.o_proj if branch == "attention" else adapter.down_proj
            parameter = layer.get_submodule(name).weight
            transposed = input_slices(layer, name, 0, 1)[0].dim == 0
            # A convolution is refitted per kernel tap from the channel Gram: the removed channels are
            # predicted from the kept ones at the same pixel, which is what the per-tap refit substitutes.
            weight = (parameter.T if transposed else matrix_view(parameter)).double()
            removed = set(removed_channels(adapter, layer, layer_plan, branch))
            kept = torch.tensor([c for c in range(weight.shape[1]) if c not in removed])
            new = refit(weight, stats.gram / stats.count, kept).to(parameter.dtype)
            if transposed:
                parameter[kept, :] = new.T
            elif parameter.dim() == 4:
                out_channels, _, height, width = parameter.shape
                parameter[:, kept] = new.reshape(out_channels, height, width, len(kept)).movedim(-1, 1)
            else:
                parameter[:, kept] = new
