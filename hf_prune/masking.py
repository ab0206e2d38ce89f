"""The reference semantics every surgery is tested against.

A removed head or neuron has the input columns of its consuming projection zeroed; a removed
branch has its whole output projection (bias included) zeroed, so the layer adds nothing for it;
a removed layer becomes the identity (a forward hook returns its input). A removed stream channel
(`PruningPlan.stream_channels`) is made exactly absent: every slice of its group is zeroed (its
producers' rows and BatchNorm shift make the stream channel identically 0, its consumers' columns
read nothing), and every LayerNorm over the stream normalises over the kept channels only (a
forward hook), as the cut LayerNorm does.

Method notes and sources: docs/methods.md §1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .groups import ArchitectureAdapter, TensorSlice
from .plan import LayerPlan, PruningPlan


def identity_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden_states, *output[1:])
    return hidden_states


def masked_slices(adapter: ArchitectureAdapter, layer: nn.Module, layer_plan: LayerPlan) -> list[TensorSlice]:
    """What masking zeroes in a kept layer: consumer slices of removed units, removed branches' output projections."""
    pieces = [piece for piece in layer_plan.removed_slices(adapter, layer) if piece.consumer]
    for branch in layer_plan.removed_branches():
        pieces += adapter.branch_consumer_slices(layer, branch)
    return pieces


@torch.no_grad()
def apply_masks(model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan) -> list[RemovableHandle]:
    """Mask `model` in place as `plan` says; returns the hooks that make removed layers the identity
    and LayerNorms over cut streams normalise over their kept channels."""
    handles = mask_stream_channels(model, adapter, plan)
    layers = adapter.layers(model)
    for layer_plan in plan.layers:
        layer = layers[layer_plan.layer]
        if not layer_plan.keep_layer:
            handles.append(layer.register_forward_hook(identity_hook, with_kwargs=True))
            continue
        for piece in masked_slices(adapter, layer, layer_plan):
            layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
    return handles


def kept_channels_norm_hook(kept: torch.Tensor):
    """A LayerNorm forward hook: normalise over the `kept` channels only, 0 on the others."""

    def hook(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor:
        channel_dim = 1 if getattr(module, "data_format", "channels_last") == "channels_first" else -1
        features = args[0].movedim(channel_dim, -1)
        normed = nn.functional.layer_norm(
            features[..., kept], (len(kept),), module.weight[kept], module.bias[kept], module.eps
        )
        result = torch.zeros_like(features)
        result[..., kept] = normed
        return result.movedim(-1, channel_dim)

    return hook


@torch.no_grad()
def mask_stream_channels(model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan) -> list[RemovableHandle]:
    """Zero every slice of the removed stream channels; hook the LayerNorms over those streams."""
    handles = []
    for stage, removed in plan.removed_stream_channels(model, adapter).items():
        members = adapter.stream_members(model, stage)
        for channel in removed:
            for piece in adapter.stage_channel_slices(model, stage, channel, members):
                model.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
        kept = torch.tensor(plan.stream_channels[stage], dtype=torch.long)
        for name in members.norms:
            norm = model.get_submodule(name)
            handles.append(norm.register_forward_hook(kept_channels_norm_hook(kept.to(norm.weight.device))))
    return handles
