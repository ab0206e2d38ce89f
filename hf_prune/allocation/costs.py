"""What removing one head, KV group, neuron or routed expert saves, in parameters or FLOPs per token.

Counted from the adapter's group slices, so fused, gated and biased projections are exact. A
FLOP is 2 per multiply-add, as `hf_prune.evaluation.flops_per_token` counts; a query head also
saves its attention over `context` tokens (QKᵀ and AV: `4 · head_dim · context` per token).

In a mixture-of-experts layer with `E` routed experts of which `k` run per token, a neuron is the same
neuron of every expert: it holds `E` experts' slices of parameters but runs in `k` of them per token
(`2k/E` FLOPs per parameter); an expert holds its router row and its slice of every expert tensor, all its
neurons included, but per token saves only its router row's FLOPs (the token still runs `k` experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..groups import ArchitectureAdapter, GroupKind
from ..groups.experts import experts_per_token

CostUnit = Literal["params", "flops"]


@dataclass(frozen=True)
class UnitCosts:
    """Savings of one unit of each kind in one layer (0 where the layer has no such unit)."""

    kv_group: float
    head: float
    neuron: float
    num_kv_groups: int
    heads_per_group: int
    num_neurons: int
    #: routed experts (mixture-of-experts layers; 0 elsewhere), what one saves, and how many must stay (top-k)
    expert: float = 0.0
    num_experts: int = 0
    min_experts: int = 0
    #: whether an expert's cost holds its neurons (parameters: removing `r` of `E` experts leaves each neuron
    #: `(E − r)/E` of its cost; FLOPs: a neuron runs in `k` experts per token whichever experts stay)
    experts_hold_neurons: bool = False

    @property
    def attention_units(self) -> int:
        """KV groups on GQA layers, heads on MHA layers: the unit a budget removes."""
        return self.num_kv_groups

    @property
    def prunable(self) -> float:
        """What the layer's heads, neurons and routed experts hold together (each counted once)."""
        mlp = self.num_neurons * self.neuron + self.num_experts * self.expert
        if self.experts_hold_neurons:
            mlp = self.num_experts * self.expert
        return self.num_kv_groups * self.kv_group + mlp

    def neuron_without(self, experts: int) -> float:
        """What one neuron saves once `experts` routed experts are gone."""
        if not self.experts_hold_neurons:
            return self.neuron
        return self.neuron * (self.num_experts - experts) / self.num_experts


def _slice_parameters(adapter: ArchitectureAdapter, layer: nn.Module, index: int, kind: GroupKind) -> int:
    groups = adapter.groups(layer, index, kind)
    return sum(piece.numel(layer) for piece in groups[0].slices) if groups else 0


def unit_costs(
    adapter: ArchitectureAdapter, layer: nn.Module, index: int, unit: CostUnit, context: int, config=None
) -> UnitCosts:
    """Costs of layer `index`'s units; `context` matters for FLOPs only; `config` (the model's) says how many
    experts a token runs in mixture-of-experts layers."""
    geometry = adapter.geometry(layer)
    attention, width = geometry.attention, geometry.intermediate_size or 0
    kv_group = head = expert = router = 0.0
    if attention is not None:
        kv_group = _slice_parameters(adapter, layer, index, "kv_groups")
        head = _slice_parameters(adapter, layer, index, "heads")
    neuron = _slice_parameters(adapter, layer, index, adapter.neuron_kind) if width else 0
    layout = adapter.experts_of(layer) if geometry.experts else None
    top_k = (experts_per_token(config) if config is not None else None) or 1
    if layout is not None:
        expert = _slice_parameters(adapter, layer, index, "experts")
        router = sum(layer.get_parameter(name)[0].numel() for name in layout.router_parameters)
    if unit == "flops":
        per_head = 4 * attention.head_dim * context if attention is not None else 0
        kv_group = 2 * kv_group + per_head * (attention.heads_per_group if attention is not None else 0)
        head, neuron = 2 * head + per_head, 2 * neuron
        if layout is not None:  # a neuron runs in top-k of the E experts; an expert saves its router row
            neuron, expert = neuron * top_k / geometry.experts, 2 * router
    return UnitCosts(
        kv_group=float(kv_group),
        head=float(head),
        neuron=float(neuron),
        num_kv_groups=attention.num_kv_heads if attention is not None else 0,
        heads_per_group=attention.heads_per_group if attention is not None else 0,
        num_neurons=width,
        expert=float(expert),
        num_experts=geometry.experts if layout is not None else 0,
        min_experts=top_k if layout is not None else 0,
        experts_hold_neurons=layout is not None and unit == "params",
    )
