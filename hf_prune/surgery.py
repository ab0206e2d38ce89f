"""Physical removal: slice parameters, swap removed branches for stand-ins, drop layers.

Stream channels (`PruningPlan.stream_channels`) are cut first, on the dense model, where every
name their groups hold still exists; then the removed heads' entries of per-head state the layers share
(`PruningPlan.removed_shared_head_slices`); then the layers; then removed layers go. Works on real
tensors and on meta tensors alike, so the same code shapes a loader-format checkpoint's skeleton
before its weights are loaded.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .groups import ArchitectureAdapter, TensorSlice
from .groups.base import renumber_layer
from .plan import LayerPlan, PruningPlan


def slice_tensors(root: nn.Module, pieces: list[TensorSlice]) -> None:
    """Remove every slice in `pieces` from the parameters and buffers (BatchNorm statistics) of
    `root` they name, then bring the modules' size attributes in line with their new weights."""
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for piece in pieces:
        removed[(piece.parameter, piece.dim)].update(range(piece.start, piece.stop))
    for (name, _dim), indices in list(removed.items()):
        module_name, _, attribute = name.rpartition(".")
        module = root.get_submodule(module_name)
        if (
            isinstance(module, nn.modules.batchnorm._BatchNorm)
            and attribute == "weight"
            and module.track_running_stats
        ):
            # Running statistics are buffers, not group slices (adapters): they follow the weight's channels.
            for buffer in ("running_mean", "running_var"):
                removed[(f"{module_name}.{buffer}", 0)].update(indices)
    buffers = dict(root.named_buffers())
    for (name, dim), indices in removed.items():
        tensor = buffers[name] if name in buffers else root.get_parameter(name)
        keep = torch.tensor(
            [i for i in range(tensor.shape[dim]) if i not in indices], dtype=torch.long, device=tensor.device
        )
        module_name, _, attribute = name.rpartition(".")
        module = root.get_submodule(module_name)
        kept = tensor.detach().index_select(dim, keep)
        setattr(module, attribute, kept if name in buffers else nn.Parameter(kept, tensor.requires_grad))
    for module in root.modules():
        _sync_shape(module)


def _sync_shape(module: nn.Module) -> None:
    """Size attributes that forward() or repr() read, from the module's (sliced) tensors."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, Conv1D):
        module.nx, module.nf = module.weight.shape
    elif isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
        module.out_channels = module.weight.shape[0]
        if depthwise:
            module.groups = module.out_channels
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._NormBase):
        tensor = module.weight if module.weight is not None else module.running_mean
        if tensor is not None:
            module.num_features = tensor.shape[0]
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.GroupNorm) and module.weight is not None:
        per_channel = module.num_groups == module.num_channels
        module.num_channels = module.weight.shape[0]
        if per_channel:
            module.num_groups = module.num_channels


@torch.no_grad()
def cut_layer(layer: nn.Module, adapter: ArchitectureAdapter, layer_plan: LayerPlan) -> None:
    """Make one kept layer physically smaller as its plan says (in place)."""
    experts = layer_plan.geometry.experts is not None and (layer_plan.changes_experts or layer_plan.changes_mlp)
    pieces = list(layer_plan.removed_slices(adapter, layer))
    if layer_plan.changes_experts:
        layout = adapter.experts_of(layer)
        pieces += [p for e in layer_plan.removed_experts() for p in layout.buffer_slices(e)]
        gone = layout.entry_prefixes(layer_plan.removed_experts())  # per-expert lists: those entries are dropped
        pieces = [piece for piece in pieces if not piece.parameter.startswith(gone)] if gone else pieces
    slice_tensors(layer, pieces)
    if layer_plan.changes_experts:
        layout.drop_experts(layer, layer_plan.removed_experts())
    if experts:
        adapter.set_expert_geometry(layer, layer_plan.geometry, layer_plan.pruned_geometry())
    if layer_plan.changes_attention:
        adapter.set_attention_geometry(layer, layer_plan.pruned_geometry().attention)
    for branch in layer_plan.removed_branches():
        adapter.remove_branch(layer, branch)


#: The attribute `drop_layers` leaves on a model whose layers it removed: `{"kept": [original indices], "fields":
#: {config field: value before}}` (composed over repeated removals), so that a loader-format folder can rebuild
#: the dense skeleton and drop the same layers (blocks built from their index or the layer count stay exact).
DENSE_LAYERS = "hf_prune_dense_layers"


def drop_layers(model: nn.Module, adapter: ArchitectureAdapter, kept: list[int]) -> None:
    """Keep only the layers `kept` (original indices), renumbered, and rewrite the layer-count config fields;
    `DENSE_LAYERS` records the original indices and the config fields as they were."""
    layers = adapter.layers(model)
    if len(kept) == len(layers):
        return
    before = model.config.to_dict()
    adapter.set_layers(model, nn.ModuleList(layers[i] for i in kept))
    for new_index, (old_index, layer) in enumerate(zip(kept, adapter.layers(model))):
        renumber_layer(layer, old_index, new_index)
    adapter.update_config_for_layers(model.config, kept)
    after = model.config.to_dict()
    previous = getattr(model, DENSE_LAYERS, None) or {"kept": list(range(len(layers))), "fields": {}}
    fields = {key: value for key, value in before.items() if after.get(key) != value}
    record = {"kept": [previous["kept"][i] for i in kept], "fields": fields | previous["fields"]}
    object.__setattr__(model, DENSE_LAYERS, record)


@torch.no_grad()
def apply_plan(model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan) -> None:
    """Make `model` physically smaller as `plan` says (in place); updates the layer-count config fields
    (stream widths are config fields only when the vanilla format can hold them: `decide_format`)."""
    stream_slices = plan.removed_stream_slices(model, adapter)
    if stream_slices:
        slice_tensors(model, stream_slices)
    shared_slices = plan.removed_shared_head_slices(model, adapter)  # heads tied across layers: their shared state
    if shared_slices:
        slice_tensors(model, shared_slices)
    layers = adapter.layers(model)
    for layer_plan in plan.layers:
        if layer_plan.keep_layer:
            cut_layer(layers[layer_plan.layer], adapter, layer_plan)
    drop_layers(model, adapter, plan.kept_layers)
