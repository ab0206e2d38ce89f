"""A pruning plan: per layer, which heads, KV groups, neurons, branches survive.

The plan is plain data in terms of the *original* indices. Masking (`masking.py`) and surgery
(`surgery.py`) both read it, which is what makes "surgery equals the masked model" testable.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from .groups import ArchitectureAdapter, AttentionGeometry, LayerGeometry, TensorSlice


@dataclass
class LayerPlan:
    """What one layer keeps. Index lists hold original indices, in increasing order."""

    layer: int
    geometry: LayerGeometry
    keep_layer: bool = True
    keep_attention: bool = True
    keep_mlp: bool = True
    kv_heads: tuple[int, ...] = ()
    query_heads: tuple[int, ...] = ()
    neurons: tuple[int, ...] = ()

    @classmethod
    def keep_all(cls, layer: int, geometry: LayerGeometry) -> LayerPlan:
        attention = geometry.attention
        return cls(
            layer,
            geometry,
            keep_attention=attention is not None,
            keep_mlp=geometry.intermediate_size is not None,
            kv_heads=tuple(range(attention.num_kv_heads)) if attention else (),
            query_heads=tuple(range(attention.num_heads)) if attention else (),
            neurons=tuple(range(geometry.intermediate_size or 0)),
        )

    @classmethod
    def first(cls, layer: int, dense: LayerGeometry, target: LayerGeometry) -> LayerPlan:
        """A plan that keeps the first units of a dense layer so that it takes `target`'s shape.

        Used to rebuild a loader-format checkpoint: the saved weights fill the shapes.
        """
        plan = cls.keep_all(layer, dense)
        plan.keep_attention = target.attention is not None
        plan.keep_mlp = target.intermediate_size is not None
        if target.attention and dense.attention:
            per_group = target.attention.heads_per_group
            plan.kv_heads = tuple(range(target.attention.num_kv_heads))
            plan.query_heads = tuple(h for j in plan.kv_heads for h in dense.attention.heads_of_group(j)[:per_group])
        if target.intermediate_size:
            plan.neurons = tuple(range(target.intermediate_size))
        return plan

    @classmethod
    def from_dict(cls, data: dict, geometry: LayerGeometry) -> LayerPlan:
        """The inverse of `to_dict`; `geometry` is the dense layer's, read from the model."""
        return cls(
            data["layer"],
            geometry,
            data["keep_layer"],
            data["keep_attention"],
            data["keep_mlp"],
            tuple(data["kv_heads"]),
            tuple(data["query_heads"]),
            tuple(data["neurons"]),
        )

    def pruned_geometry(self) -> LayerGeometry:
        attention = self.geometry.attention
        kept_attention = (
            AttentionGeometry(len(self.query_heads), len(self.kv_heads), attention.head_dim)
            if self.keep_attention and attention
            else None
        )
        return LayerGeometry(kept_attention, len(self.neurons) if self.keep_mlp and self.geometry.intermediate_size else None)

    @property
    def changes_attention(self) -> bool:
        attention = self.geometry.attention
        return attention is not None and self.keep_attention and len(self.query_heads) < attention.num_heads

    @property
    def changes_mlp(self) -> bool:
        size = self.geometry.intermediate_size
        return size is not None and self.keep_mlp and len(self.neurons) < size

    def removed_slices(self, adapter: ArchitectureAdapter, layer: nn.Module) -> Iterator[TensorSlice]:
        """Slices of every removed head, KV head and neuron inside branches that stay."""
        attention = self.geometry.attention
        if self.changes_attention:
            for head in sorted(set(range(attention.num_heads)) - set(self.query_heads)):
                yield from adapter.query_head_slices(layer, attention, head)
            for kv_head in sorted(set(range(attention.num_kv_heads)) - set(self.kv_heads)):
                yield from adapter.kv_head_slices(layer, attention, kv_head)
        if self.changes_mlp:
            size = self.geometry.intermediate_size
            for neuron in sorted(set(range(size)) - set(self.neurons)):
                yield from adapter.neuron_slices(layer, size, neuron)

    def removed_branches(self) -> list[str]:
        removed = []
        if self.geometry.attention is not None and not self.keep_attention:
            removed.append("attention")
        if self.geometry.intermediate_size is not None and not self.keep_mlp:
            removed.append("mlp")
        return removed

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "keep_layer": self.keep_layer,
            "keep_attention": self.keep_attention,
            "keep_mlp": self.keep_mlp,
            "kv_heads": list(self.kv_heads),
            "query_heads": list(self.query_heads),
            "neurons": list(self.neurons),
        }


@dataclass
class PruningPlan:
    layers: list[LayerPlan] = field(default_factory=list)

    @classmethod
    def keep_all(cls, model: nn.Module, adapter: ArchitectureAdapter) -> PruningPlan:
        return cls([LayerPlan.keep_all(i, adapter.geometry(layer)) for i, layer in enumerate(adapter.layers(model))])

    @property
    def kept_layers(self) -> list[int]:
        return [plan.layer for plan in self.layers if plan.keep_layer]

    def removed_parameter_count(self, model: nn.Module, adapter: ArchitectureAdapter) -> int:
        """Parameters the plan removes, counted from the group slices (independent of surgery)."""
        layers = adapter.layers(model)
        removed = 0
        for plan in self.layers:
            layer = layers[plan.layer]
            if not plan.keep_layer:
                removed += sum(p.numel() for p in layer.parameters())
                continue
            slices = list(plan.removed_slices(adapter, layer))
            for branch in plan.removed_branches():
                slices += adapter.branch_slices(layer, branch)
            removed += sum(piece.numel(layer) for piece in slices)
        return removed
