"""Physical removal: slice parameters, swap removed branches for stand-ins, drop layers.

Works on real tensors and on meta tensors alike, so the same code shapes a loader-format
checkpoint's skeleton before its weights are loaded.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .groups import ArchitectureAdapter, TensorSlice
from .plan import PruningPlan


def _slice_parameters(layer: nn.Module, pieces: list[TensorSlice]) -> None:
    removed: dict[tuple[str, int], set[int]] = defaultdict(set)
    for piece in pieces:
        removed[(piece.parameter, piece.dim)].update(range(piece.start, piece.stop))
    for (name, dim), indices in removed.items():
        parameter = layer.get_parameter(name)
        keep = torch.tensor(
            [i for i in range(parameter.shape[dim]) if i not in indices], dtype=torch.long, device=parameter.device
        )
        module_name, _, attribute = name.rpartition(".")
        module = layer.get_submodule(module_name)
        setattr(module, attribute, nn.Parameter(parameter.detach().index_select(dim, keep), parameter.requires_grad))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and attribute == "weight":
            # The running statistics are buffers, not group slices: they follow the weight's channels.
            for buffer in ("running_mean", "running_var"):
                setattr(module, buffer, getattr(module, buffer).index_select(0, keep))
            module.num_features = len(keep)
    for module in layer.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Conv2d):
            module.out_channels, module.in_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
        elif isinstance(module, Conv1D):
            module.nx, module.nf = module.weight.shape


@torch.no_grad()
def apply_plan(model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan) -> None:
    """Make `model` physically smaller as `plan` says (in place); updates the layer-count config fields."""
    layers = adapter.layers(model)
    for layer_plan in plan.layers:
        if not layer_plan.keep_layer:
            continue
        layer = layers[layer_plan.layer]
        _slice_parameters(layer, list(layer_plan.removed_slices(adapter, layer)))
        if layer_plan.changes_attention:
            adapter.set_attention_geometry(layer, layer_plan.pruned_geometry().attention)
        for branch in layer_plan.removed_branches():
            adapter.remove_branch(layer, branch)

    kept = plan.kept_layers
    if len(kept) < len(layers):
        adapter.set_layers(model, nn.ModuleList(layers[i] for i in kept))
        for new_index, layer in enumerate(adapter.layers(model)):
            # The KV cache is indexed by `layer_idx`: renumber so generate() sees 0..n-1.
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = new_index
        adapter.update_config_for_layers(model.config, kept)
