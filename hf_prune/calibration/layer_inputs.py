"""The calibration inputs of every layer, so layers can be run one at a time.

A pass through the model with each layer replaced by a stand-in that records its arguments and
returns its input unchanged captures the first layer's hidden states and every layer's other
arguments (masks, position embeddings), which differ between layer types (sliding-window and
full attention, local and global rotary embeddings); no layer computes. The low-memory mode runs
it with only the tensors outside the layer stack loaded; the sequential repair on a whole model.

What the model runs between two layers outside the layer stack (ConvNeXt downsamples before each
stage: `ArchitectureAdapter.layer_entries`) is kept as `LayerInputs.entries`: whoever walks the
layers one at a time passes the stream through `entering(index, ...)` before layer `index`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UnsupportedArchitectureError
from ..groups import ArchitectureAdapter
from ..groups.base import replace_module


def first_output(output):
    """A layer's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _Captured(Exception):
    """Raised by the last layer's stand-in: nothing after the layer stack is needed (or loaded)."""


@dataclass
class LayerInputs:
    """The calibration inputs of the current layer: per batch, the hidden states; per layer and
    batch, the other arguments the model passes; per layer, the modules the model runs on the
    stream right before it, outside the layer stack (`entries`; most layers have none)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[tuple]] = field(default_factory=list)
    kwargs: list[list[dict]] = field(default_factory=list)
    entries: dict[int, list[nn.Module]] = field(default_factory=dict)

    @torch.no_grad()
    def entering(self, index: int, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """`stream` (one tensor per batch, as layer `index - 1` leaves it) as layer `index` reads it."""
        for module in self.entries.get(index, ()):
            stream = [module(h) for h in stream]
        return stream

    @torch.no_grad()
    def outputs(self, layer: nn.Module, index: int) -> list[torch.Tensor]:
        """`layer`'s outputs for every batch (layer `index`'s arguments)."""
        return [first_output(layer(h, *a, **k)) for h, a, k in zip(self.hidden, self.args[index], self.kwargs[index])]

    @torch.no_grad()
    def through(self, layers, indices: range, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """`stream` (one tensor per batch) run through `layers[index]` for each of `indices` as they are
        now (each after what runs before it outside the stack, `entering`)."""
        for index in indices:
            stream = self.entering(index, stream)
            stream = [
                first_output(layers[index](h, *a, **k))
                for h, a, k in zip(stream, self.args[index], self.kwargs[index])
            ]
        return stream

    @torch.no_grad()
    def run(self, layer: nn.Module, index: int, advance: bool) -> None:
        """Run every batch through `layer` (for its hooks); with `advance`, each batch's outputs
        replace its inputs at once, so inputs and outputs are never held whole side by side."""
        for batch, (args, kwargs) in enumerate(zip(self.args[index], self.kwargs[index])):
            output = first_output(layer(self.hidden[batch], *args, **kwargs))
            if advance:
                self.hidden[batch] = output


class _Recorder(nn.Module):
    """Stands in for a (weightless) layer while the inputs are captured: records what the model
    passes it and returns the hidden states unchanged; the last one stops the forward pass.
    Attributes the model reads from its layers (`attention_type`, ...) come from the real layer."""

    def __init__(self, layer: nn.Module, index: int, inputs: LayerInputs, last: bool):
        super().__init__()
        object.__setattr__(self, "layer", layer)  # not a submodule: the stand-in owns nothing
        self.index, self.inputs, self.last = index, inputs, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["layer"], name)

    def forward(self, *args, **kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        if self.index == 0:
            self.inputs.hidden.append(hidden)
        self.inputs.args[self.index].append(tuple(rest))
        self.inputs.kwargs[self.index].append(kwargs)
        if self.last:
            raise _Captured
        return hidden


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> LayerInputs:
    """Run the model through stand-ins for its layers: the first layer's hidden states and every
    layer's other arguments, per batch. What runs between layers outside the stack (`entries`)
    runs here on the first layer's hidden states, so its weights must be loaded."""
    layers = list(adapter.layers(model))  # a base adapter returns the live list, changed below
    if layers and len(adapter.layer_parts(model, 0)) > 1:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} keeps each layer's parts in parallel lists (`layer_parts`): layers cannot be "
            "run one at a time. Use a criterion that needs no layer-by-layer pass (criterion='magnitude') and "
            "no sequential repair or low-memory mode."
        )
    entries = {
        index: [part for name in names for part in _callables(model.get_submodule(name))]
        for index, names in adapter.layer_entries(model).items()
    }
    inputs = LayerInputs(args=[[] for _ in layers], kwargs=[[] for _ in layers], entries=entries)
    base = getattr(model, model.base_model_prefix, model)
    extra = {"use_cache": False} if getattr(model.config, "use_cache", False) else {}
    # Each layer is swapped in place (convolutional stages hold their blocks in separate lists).
    names = [adapter.layer_name(model, index) for index in range(len(layers))]
    for index, (name, layer) in enumerate(zip(names, layers)):
        replace_module(model, name, _Recorder(layer, index, inputs, last=index == len(layers) - 1))
    try:
        for batch in tqdm(batches, desc="embeddings", unit="batch", leave=False):
            batch = batch.to(device)
            key = "pixel_values" if batch.is_floating_point() else "input_ids"
            with contextlib.suppress(_Captured):
                base(**{key: batch.to(dtype) if key == "pixel_values" and dtype else batch}, **extra)
    finally:
        for name, layer in zip(names, layers):
            replace_module(model, name, layer)
    return inputs


def _callables(module: nn.Module) -> list[nn.Module]:
    """The modules a forward pass calls for `module`: a `ModuleList`'s items in order (the owner
    iterates it), else the module itself."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]
