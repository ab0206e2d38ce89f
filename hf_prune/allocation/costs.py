"""What removing one head, KV group or neuron saves, in parameters or FLOPs per token.

Counted from the adapter's group slices, so fused, gated and biased projections are exact. A
FLOP is 2 per multiply-add, as `hf_prune.evaluation.flops_per_token` counts; a query head also
saves its attention over `context` tokens (QKᵀ and AV: `4 · head_dim · context` per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..groups import ArchitectureAdapter, GroupKind

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

    @property
    def attention_units(self) -> int:
        """KV groups on GQA layers, heads on MHA layers: the unit a budget removes."""
        return self.num_kv_groups

    @property
    def prunable(self) -> float:
        """What the layer's heads and neurons hold together."""
        return self.num_kv_groups * self.kv_group + self.num_neurons * self.neuron


def _slice_parameters(adapter: ArchitectureAdapter, layer: nn.Module, index: int, kind: GroupKind) -> int:
    groups = adapter.groups(layer, index, kind)
    return sum(piece.numel(layer) for piece in groups[0].slices) if groups else 0


def unit_costs(adapter: ArchitectureAdapter, layer: nn.Module, index: int, unit: CostUnit, context: int) -> UnitCosts:
    """Costs of layer `index`'s units; `context` matters for FLOPs only."""
    geometry = adapter.geometry(layer)
    attention, width = geometry.attention, geometry.intermediate_size or 0
    kv_group = head = 0.0
    if attention is not None:
        kv_group = _slice_parameters(adapter, layer, index, "kv_groups")
        head = _slice_parameters(adapter, layer, index, "heads")
    neuron = _slice_parameters(adapter, layer, index, adapter.neuron_kind) if width else 0
    if unit == "flops":
        per_head = 4 * attention.head_dim * context if attention is not None else 0
        kv_group = 2 * kv_group + per_head * (attention.heads_per_group if attention is not None else 0)
        head, neuron = 2 * head + per_head, 2 * neuron
    return UnitCosts(
        kv_group=float(kv_group),
        head=float(head),
        neuron=float(neuron),
        num_kv_groups=attention.num_kv_heads if attention is not None else 0,
        heads_per_group=attention.heads_per_group if attention is not None else 0,
        num_neurons=width,
    )
