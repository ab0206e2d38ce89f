"""The reference semantics every surgery is tested against.

A removed head or neuron has the input columns of its consuming projection zeroed; a removed
branch has its whole output projection (bias included) zeroed, so the layer adds nothing for it;
a removed layer becomes the identity (a forward hook returns its input).
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
    """Mask `model` in place as `plan` says; returns the hooks that make removed layers the identity."""
    layers = adapter.layers(model)
    handles = []
    for layer_plan in plan.layers:
        layer = layers[layer_plan.layer]
        if not layer_plan.keep_layer:
            handles.append(layer.register_forward_hook(identity_hook, with_kwargs=True))
            continue
        for piece in masked_slices(adapter, layer, layer_plan):
            layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
    return handles
