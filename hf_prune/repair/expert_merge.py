"""`expert_repair="merge"`: fold each removed routed expert into the kept expert it is most often routed with.

For a removed expert r, its partner is `t = argmax_{t kept} C[r, t]`, with `C` the calibration tokens whose
top-k holds both (`RoutingStatistics.co_selected`; ties go to the lower index; an expert never chosen with a
kept one is dropped unmerged). Every kept expert t that receives the removed experts `R_t` becomes their
frequency-weighted average, tensor by tensor (gate/up, down projection, expert biases):

    W_t ← (n_t W_t + Σ_{r ∈ R_t} n_r W_r) / (n_t + Σ_{r ∈ R_t} n_r)

with `n` the tokens routed to each expert (`RoutingStatistics.selected`). The router rows stay as they are: the
tokens that chose r now reach t only where t is in their top-k among the kept experts, as after plain removal.
This is the frequency-weighted merging of M-SMoE (Li et al. 2024, "Merge, Then Compress: Demystify Efficient
SMoE with Hints from Its Routing Policy", arXiv:2310.01334) and HC-SMoE (Chen et al. 2024, "Retraining-Free
Merging of Sparse MoE via Hierarchical Clustering", arXiv:2410.08589), with co-routing as the grouping and
without M-SMoE's neuron permutation alignment. Like the other repairs it is written into the kept experts
before surgery, so masking the merged model and cutting it agree exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.statistics import CalibrationStatistics, RoutingStatistics
from ..errors import InvalidPruningTargetError
from ..groups import ArchitectureAdapter
from ..groups.experts import ExpertLayout
from ..plan import LayerPlan, PruningPlan


def merge_partners(routing: RoutingStatistics, kept: list[int], removed: list[int]) -> dict[int, list[int]]:
    """Kept expert → the removed experts merged into it (each removed one goes to the kept expert it is most
    often chosen with; none if it never is)."""
    partners: dict[int, list[int]] = {}
    together = routing.co_selected[:, kept]
    for expert in removed:
        if together[expert].max() <= 0:
            continue
        partners.setdefault(kept[int(together[expert].argmax())], []).append(expert)
    return partners


@torch.no_grad()
def merge_layer_experts(layer: nn.Module, layout: ExpertLayout, layer_plan: LayerPlan, routing: RoutingStatistics):
    """Merge the layer's removed experts into their partners, in place (`merge_partners`)."""
    kept, removed = list(layer_plan.experts), layer_plan.removed_experts()
    counts = routing.selected
    for target, sources in merge_partners(routing, kept, removed).items():
        members = [target, *sources]
        weights = counts[members] / counts[members].sum()
        for tensor in layout.tensors:
            parameter = layer.get_parameter(tensor.parameter)
            stacked = parameter[members].double()
            shape = (-1,) + (1,) * (stacked.dim() - 1)
            parameter[target] = (stacked * weights.to(stacked.device).reshape(shape)).sum(0).to(parameter.dtype)


def merge_removed_experts(
    model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan, statistics: CalibrationStatistics | None
) -> None:
    """`merge_layer_experts` in every kept layer that loses experts (reads `routing` statistics)."""
    layers = adapter.layers(model)
    for layer_plan in plan.layers:
        if not (layer_plan.keep_layer and layer_plan.changes_experts):
            continue
        if statistics is None or layer_plan.layer not in statistics.routing:
            raise InvalidPruningTargetError(
                f"expert_repair='merge' reads which experts are routed together, but layer {layer_plan.layer}'s "
                "routing was not measured; collect the statistics with 'routing' (HFPruner.prune does) or set "
                "expert_repair='none'."
            )
        layer = layers[layer_plan.layer]
        if adapter.experts_of(layer).per_expert:
            raise InvalidPruningTargetError(
                f"expert_repair='merge' averages fused expert tensors by the co-routing counts of the router's "
                f"top-k; layer {layer_plan.layer}'s experts are a per-expert module list, whose block applies the "
                "gate weights itself (no top-k measured); set expert_repair='none'."
            )
        merge_layer_experts(layer, adapter.experts_of(layer), layer_plan, statistics.routing[layer_plan.layer])
