"""The reference semantics every surgery is tested against.

A removed head or neuron has the input columns of its consuming projection zeroed; a removed
branch has its whole output projection (bias included) zeroed, so the layer adds nothing for it;
a removed layer becomes the identity (a forward hook returns its input). A removed stream channel
(`PruningPlan.stream_channels`) is made exactly absent: every slice of its group is zeroed (its
producers' rows and BatchNorm shift make the stream channel identically 0, its consumers' columns
read nothing), and every LayerNorm over the stream normalises over the kept channels only (a
forward hook), as the cut LayerNorm does. A removed routed expert is never selected: a forward hook on
the router gives it the logit −∞ before the top-k, by running the router's own forward on the kept rows
only (so the family's softmax, top-k and renormalisation see exactly the experts that stay) and mapping
the chosen indices back to the original expert numbers.

Method notes and sources: docs/methods.md §1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .groups import ArchitectureAdapter, TensorSlice
from .groups.experts import COUNT_ATTRIBUTES
from .plan import LayerPlan, PruningPlan


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
            handles += adapter.skip_layer(model, layer_plan.layer)
            continue
        for piece in masked_slices(adapter, layer, layer_plan):
            layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
        if layer_plan.changes_experts:
            handles.append(hook_kept_experts(adapter, layer, layer_plan.experts))
    return handles


def hook_kept_experts(adapter: ArchitectureAdapter, layer: nn.Module, experts: tuple[int, ...]) -> RemovableHandle:
    """Hook the router of `layer` (a mixture of experts) so that only `experts` are ever selected
    (`kept_experts_hook`); the handle removes it."""
    layout = adapter.experts_of(layer)
    router = layer.get_submodule(layout.router)
    kept = torch.tensor(experts, dtype=torch.long, device=layer.get_parameter(layout.router_parameters[0]).device)
    names = [name.removeprefix(layout.router + ".") for name in (*layout.router_parameters, *layout.router_buffers)]
    return router.register_forward_hook(kept_experts_hook(kept, names), with_kwargs=True)


def kept_experts_hook(kept: torch.Tensor, parameters: list[str]):
    """A router forward hook: the router's output as if only the `kept` experts existed (its `parameters`,
    one row per expert, cut to the kept rows), in the original numbering: logits −∞ and never an index
    of a removed expert."""

    running = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output):
        if running:  # the restricted call below runs this hook again
            return output
        count = module.get_parameter(parameters[0]).shape[0]
        running.append(True)
        try:
            restricted = run_kept_experts(module, kept, parameters, args, kwargs)
        finally:
            running.pop()
        return _renumbered(output, restricted, kept, count)

    return hook


def run_kept_experts(module: nn.Module, kept: torch.Tensor, parameters: list[str], args: tuple, kwargs: dict):
    """The router's own forward on `args` as if only the `kept` experts existed: its `parameters` (one row per
    expert) cut to the kept rows, and the size attributes its forward reads (`num_experts`) saying the kept
    count during the call. Expert indices in the output count the kept experts (0 .. len(kept) − 1)."""
    count = module.get_parameter(parameters[0]).shape[0]
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    rows = {name: tensors[name][kept] for name in parameters}
    sizes = {a: getattr(module, a) for a in COUNT_ATTRIBUTES if getattr(module, a, None) == count}
    try:
        for attribute in sizes:
            setattr(module, attribute, len(kept))
        return torch.func.functional_call(module, rows, args, kwargs)
    finally:
        for attribute, value in sizes.items():
            setattr(module, attribute, value)


def _renumbered(dense, restricted, kept: torch.Tensor, count: int):
    """`restricted` (the router run on the kept experts) in the shape of `dense`: per-expert outputs
    (last dimension `count`) widened with −∞ for the removed experts, expert indices mapped back."""
    if isinstance(dense, (tuple, list)):
        return type(dense)(_renumbered(d, r, kept, count) for d, r in zip(dense, restricted))
    if not isinstance(dense, torch.Tensor):
        return restricted
    if not restricted.is_floating_point():
        return kept[restricted]
    if dense.shape[-1] == count and restricted.shape[-1] == len(kept):
        widened = restricted.new_full(dense.shape, float("-inf"))
        widened[..., kept] = restricted
        return widened
    return restricted


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
