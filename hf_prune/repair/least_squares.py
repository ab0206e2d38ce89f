"""Training-free repair of the projections that consume pruned channels.

- `lstsq` refits the consumer from the calibration statistics so it reproduces the dense output
  from the channels that stay (docs/methods.md §4.1): `W'_S = W G[:, S] (G[S, S] + λI)⁻¹`, with `G` the
  Gram matrix of the consumer's input and `λ` the ridge `PruningConfig.damping` times G's mean
  diagonal.
- `bias` (FLAP) gives back the removed channels' mean contribution (`bias.py`).
- `ispasp` re-selects which neurons, heads or KV groups stay with i-SpaSP's CoSaMP iterations,
  starting from the criterion's choice, then refits like `lstsq` (`ispasp.py`).
- With `lstsq`, every module that reads a removed stream channel of a convolutional stage is
  refitted on its own input (`stream.py`).
- With `lstsq` and `ispasp`, the MLP before a run of removed layers is refitted to also add what
  they added to the residual stream (`removed_layers.py`).

Repairs are written into the kept columns (and the bias) of the dense weight before surgery, so
masking and surgery still agree exactly.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..calibration.statistics import CalibrationStatistics, ChannelStatistics
from ..errors import InvalidPruningTargetError
from ..groups import ArchitectureAdapter, Branch
from ..groups.base import input_slices, matrix_view
from ..kinds import DAMPING
from ..plan import LayerPlan, PruningPlan
from .bias import fold_constant_into_columns, removed_mean_contribution
from .ispasp import least_squares_columns
from .ispasp import select as ispasp_select
from .stream import refit_stream_consumers


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


def _reselect(plan: LayerPlan, branch: Branch, weight: torch.Tensor, gram: torch.Tensor, damping: float) -> LayerPlan:
    """The layer plan with i-SpaSP's choice of neurons, heads (MHA) or whole KV groups.

    Query heads removed inside GQA groups keep the criterion's choice: every group must keep the
    same count, a constraint CoSaMP's free selection does not respect.
    """
    if branch == "mlp":
        blocks = [torch.tensor([n]) for n in range(plan.geometry.intermediate_size)]
        kept = ispasp_select(weight, gram, blocks, list(plan.neurons), damping=damping)
        return dataclasses.replace(plan, neurons=tuple(kept))
    attention = plan.geometry.attention
    per_group, d = attention.heads_per_group, attention.head_dim
    if len(plan.query_heads) != len(plan.kv_heads) * per_group:
        return plan
    blocks = [
        torch.cat([torch.arange(h * d, (h + 1) * d) for h in attention.heads_of_group(j)])
        for j in range(attention.num_kv_heads)
    ]
    kept = ispasp_select(weight, gram, blocks, list(plan.kv_heads), damping=damping)
    return dataclasses.replace(
        plan, kv_heads=tuple(kept), query_heads=tuple(h for j in kept for h in attention.heads_of_group(j))
    )


def _repair(
    module: nn.Module,
    weight: torch.Tensor,
    stats: ChannelStatistics,
    kept: torch.Tensor,
    removed: torch.Tensor,
    method: str,
    cross_term: torch.Tensor | None,
    damping: float,
) -> torch.Tensor:
    """The consumer's new kept columns (outputs × |S|); `bias` also updates `module.bias` in place."""
    if method in ("lstsq", "ispasp"):
        return least_squares_columns(
            weight, stats.gram, kept, damping=damping, count=stats.count, cross_term=cross_term
        )
    weight = weight.double()
    constant = removed_mean_contribution(weight, stats.mean, removed)
    if getattr(module, "bias", None) is not None:
        module.bias += constant.to(module.bias.dtype)
        return weight[:, kept]
    second_moment = (
        stats.gram[kept[:, None], kept] / stats.count
        if stats.gram is not None
        else torch.diag(stats.mean_square[kept])
    )
    return weight[:, kept] + fold_constant_into_columns(constant, stats.mean[kept], second_moment, damping)


@torch.no_grad()
def refit_consumer(
    layer: nn.Module,
    adapter: ArchitectureAdapter,
    layer_plan: LayerPlan,
    branch: Branch,
    stats: ChannelStatistics,
    method: str = "lstsq",
    cross_term: torch.Tensor | None = None,
    damping: float = DAMPING,
) -> LayerPlan:
    """Repair one branch's consumer in place from the statistics of its input (`stats`): the kept
    columns (and, with `bias`, the bias) are rewritten, the removed ones left as they are. Returns the
    layer plan (`ispasp` may keep other channels than the criterion chose, always as many). The one-shot
    prune (`reconstruct`) and the `PruningCallback`'s repair at pruning events (`training.event_repair`)
    both refit here."""
    name = adapter.o_proj if branch == "attention" else adapter.down_proj
    module = layer.get_submodule(name)
    transposed = input_slices(layer, name, 0, 1)[0].dim == 0
    # A convolution is refitted per kernel tap from the channel Gram: the removed channels are
    # predicted from the kept ones at the same pixel, which is what the per-tap refit substitutes.
    parameter = module.weight
    if method == "bias" and parameter.dim() == 4:
        raise InvalidPruningTargetError(
            "reconstruct='bias' folds a per-output constant into the bias, which a convolution's per-tap "
            "view cannot express; use reconstruct='lstsq' for convolutional models."
        )
    # float32 here: the least-squares refit converts it a block at a time (8192-wide MLPs).
    weight = parameter.T if transposed else matrix_view(parameter)
    changed = layer_plan.changes_attention if branch == "attention" else layer_plan.changes_mlp
    if method == "ispasp" and changed:
        layer_plan = _reselect(layer_plan, branch, weight.double(), stats.gram / stats.count, damping)
    removed = removed_channels(adapter, layer, layer_plan, branch)
    gone = set(removed)
    kept = torch.tensor([c for c in range(weight.shape[1]) if c not in gone], device=weight.device)
    removed_tensor = torch.tensor(removed, dtype=torch.long, device=weight.device)
    new = _repair(module, weight, stats, kept, removed_tensor, method, cross_term, damping)
    new = new.to(parameter.dtype)
    if transposed:
        parameter[kept, :] = new.T
    elif parameter.dim() == 4:
        out_channels, _, height, width = parameter.shape
        parameter[:, kept] = new.reshape(out_channels, height, width, len(kept)).movedim(-1, 1)
    else:
        module.weight[:, kept] = new
    return layer_plan


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    statistics: CalibrationStatistics | None,
    method: str,
    removed_layer_cross_terms: dict[int, torch.Tensor] | None = None,
    branches: tuple[Branch, ...] = ("attention", "mlp"),
    damping: float = DAMPING,
) -> PruningPlan:
    """Repair every consumer that loses channels, in place, before surgery; returns the plan to cut
    (`ispasp` may keep other channels than the criterion chose, always as many). `removed_layer_cross_terms`
    (`repair.removed_layers.removed_layer_targets`: `C = Σ D aᵀ` per writer layer) maps a layer to what the
    removed layers after it added."""
    if method == "none":
        return plan
    if statistics is None:
        raise InvalidPruningTargetError(f"reconstruct={method!r} needs calibration statistics; set calibration=...")
    layers = adapter.layers(model)
    repaired = []
    for layer_plan in plan.layers:
        if not layer_plan.keep_layer:
            repaired.append(layer_plan)
            continue
        layer = layers[layer_plan.layer]
        for branch in branches:
            cross_term = (removed_layer_cross_terms or {}).get(layer_plan.layer) if branch == "mlp" else None
            changed = layer_plan.changes_attention if branch == "attention" else layer_plan.changes_mlp
            if not changed and cross_term is None:
                continue
            if branch == "mlp" and adapter.experts_of(layer):
                continue  # neurons inside routed experts keep the criterion's choice, unrepaired (issue 16)
            stats = statistics.consumers[(layer_plan.layer, branch)]
            layer_plan = refit_consumer(layer, adapter, layer_plan, branch, stats, method, cross_term, damping)
        repaired.append(layer_plan)
    if plan.stream_channels:
        refit_stream_consumers(model, adapter, plan, statistics, damping)
    return PruningPlan(repaired, dict(plan.stream_channels))
