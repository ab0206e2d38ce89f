"""A pruning plan: per layer, which heads, KV groups, neurons, branches survive; per stage of a
convolutional model, which stream channels survive (`stream_channels`: those groups cross layers).

The plan is plain data in terms of the *original* indices. Masking (`masking.py`) and surgery
(`surgery.py`) both read it, which is what makes "surgery equals the masked model" testable.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import InvalidPruningTargetError
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
    #: the routed experts kept (mixture-of-experts layers; empty in dense layers)
    experts: tuple[int, ...] = ()

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
            experts=tuple(range(geometry.experts or 0)),
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
        if target.experts:
            plan.experts = tuple(range(target.experts))
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
            tuple(data.get("experts", range(geometry.experts or 0))),
        )

    def pruned_geometry(self) -> LayerGeometry:
        attention = self.geometry.attention
        kept_attention = (
            AttentionGeometry(len(self.query_heads), len(self.kv_heads), attention.head_dim)
            if self.keep_attention and attention
            else None
        )
        kept_mlp = self.keep_mlp and self.geometry.intermediate_size
        return LayerGeometry(
            kept_attention,
            len(self.neurons) if kept_mlp else None,
            len(self.experts) if kept_mlp and self.geometry.experts is not None else None,
        )

    @property
    def changes_attention(self) -> bool:
        attention = self.geometry.attention
        return attention is not None and self.keep_attention and len(self.query_heads) < attention.num_heads

    @property
    def changes_mlp(self) -> bool:
        size = self.geometry.intermediate_size
        return size is not None and self.keep_mlp and len(self.neurons) < size

    @property
    def changes_experts(self) -> bool:
        count = self.geometry.experts
        return count is not None and self.keep_mlp and len(self.experts) < count

    def removed_experts(self) -> list[int]:
        return sorted(set(range(self.geometry.experts or 0)) - set(self.experts)) if self.changes_experts else []

    def removed_slices(self, adapter: ArchitectureAdapter, layer: nn.Module) -> Iterator[TensorSlice]:
        """Slices of every removed head, KV head, neuron and routed expert inside branches that stay."""
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
        for expert in self.removed_experts():
            yield from adapter.experts_of(layer).expert_slices(layer, expert)

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
        } | ({"experts": list(self.experts)} if self.geometry.experts is not None else {})


@dataclass
class PruningPlan:
    layers: list[LayerPlan] = field(default_factory=list)
    #: stage → the stream channels it keeps (original indices, increasing); stages left out keep all.
    stream_channels: dict[int, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def keep_all(cls, model: nn.Module, adapter: ArchitectureAdapter) -> PruningPlan:
        return cls([LayerPlan.keep_all(i, adapter.geometry(layer)) for i, layer in enumerate(adapter.layers(model))])

    @property
    def kept_layers(self) -> list[int]:
        return [plan.layer for plan in self.layers if plan.keep_layer]

    def removed_stream_channels(self, model: nn.Module, adapter: ArchitectureAdapter) -> dict[int, list[int]]:
        """Stage → the stream channels the plan removes (stages that lose none are left out)."""
        removed = {}
        for stage, kept in sorted(self.stream_channels.items()):
            gone = sorted(set(range(adapter.stream_width(model, stage))) - set(kept))
            if gone:
                removed[stage] = gone
        return removed

    def removed_stream_slices(self, model: nn.Module, adapter: ArchitectureAdapter) -> list[TensorSlice]:
        """Slices of every removed stream channel, named from the model root."""
        slices = []
        for stage, channels in self.removed_stream_channels(model, adapter).items():
            members = adapter.stream_members(model, stage)
            slices += [piece for c in channels for piece in adapter.stage_channel_slices(model, stage, c, members)]
        return slices

    def shared_heads(self, adapter: ArchitectureAdapter) -> tuple[tuple[int, ...], int] | None:
        """Where the adapter's heads are tied across layers (`ArchitectureAdapter.tied_heads`): the heads every
        layer that keeps its attention keeps, and the dense head count; None where heads are not tied or no layer
        keeps its attention. Layers keeping different heads cannot be cut: `InvalidPruningTargetError`."""
        if not adapter.tied_heads:
            return None
        kept = {
            (p.query_heads, p.geometry.attention.num_heads)
            for p in self.layers
            if p.keep_layer and p.keep_attention and p.geometry.attention is not None
        }
        if len(kept) > 1:
            raise InvalidPruningTargetError(
                f"the plan keeps different query_heads in different layers ({sorted(kept)}), but this model's heads "
                "share per-head state computed once for every layer (a position bias): keep the same heads in "
                "every layer (the planner does so for such adapters)"
            )
        return next(iter(kept), None)

    def removed_shared_head_slices(self, model: nn.Module, adapter: ArchitectureAdapter) -> list[TensorSlice]:
        """Slices, named from the model root, of the removed heads' entries in per-head state the layers share."""
        shared = self.shared_heads(adapter)
        if shared is None or len(shared[0]) == shared[1]:
            return []
        return adapter.shared_head_slices(model, *shared)

    def removed_parameter_count(self, model: nn.Module, adapter: ArchitectureAdapter) -> int:
        """Parameters the plan removes, counted from the group slices (independent of surgery).

        A parameter can lose rows to one group and columns to another (a stream channel and an inner
        channel of the same convolution): it keeps the product of its kept extents, never a sum.
        """
        layers = adapter.layers(model)
        pieces: list[tuple[nn.Module, TensorSlice]] = []
        for plan in self.layers:
            layer = layers[plan.layer]
            if not plan.keep_layer:  # every part of the layer (`ArchitectureAdapter.layer_parts`)
                for part in adapter.layer_parts(model, plan.layer):
                    pieces += [(part, TensorSlice(name, 0, 0, p.shape[0])) for name, p in part.named_parameters()]
                continue
            slices = list(plan.removed_slices(adapter, layer))
            for branch in plan.removed_branches():
                slices += adapter.branch_slices(layer, branch)
            pieces += [(layer, piece) for piece in slices]
        pieces += [(model, piece) for piece in self.removed_stream_slices(model, adapter)]
        pieces += [(model, piece) for piece in self.removed_shared_head_slices(model, adapter)]
        return removed_numel(pieces)

    def to_dict(self) -> dict:
        return {
            "layers": [plan.to_dict() for plan in self.layers],
            "stream_channels": {str(stage): list(kept) for stage, kept in sorted(self.stream_channels.items())},
        }

    @classmethod
    def from_dict(cls, data: dict, model: nn.Module, adapter: ArchitectureAdapter) -> PruningPlan:
        """The inverse of `to_dict`, on the dense `model` the plan was made for."""
        geometries = [adapter.geometry(layer) for layer in adapter.layers(model)]
        return cls(
            [LayerPlan.from_dict(entry, geometries[entry["layer"]]) for entry in data["layers"]],
            {int(stage): tuple(kept) for stage, kept in data.get("stream_channels", {}).items()},
        )


def removed_numel(pieces: Iterable[tuple[nn.Module, TensorSlice]]) -> int:
    """How many entries the slices remove together: per parameter, its size minus the product of
    the extents it keeps along each dimension (overlapping slices count once)."""
    removed: dict[int, tuple[torch.Tensor, dict[int, set[int]]]] = {}
    for root, piece in pieces:
        parameter = root.get_parameter(piece.parameter)
        _, per_dim = removed.setdefault(id(parameter), (parameter, {}))
        per_dim.setdefault(piece.dim % parameter.dim(), set()).update(range(piece.start, piece.stop))
    total = 0
    for parameter, per_dim in removed.values():
        kept = math.prod(size - len(per_dim.get(dim, ())) for dim, size in enumerate(parameter.shape))
        total += parameter.numel() - kept
    return total
