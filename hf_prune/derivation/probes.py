"""Dataflow probes on a tiny model: which input columns of a consumer a producer's channel reaches, what a module
returns, whether a projection's output is added to the residual stream unchanged."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..groups.base import in_features, out_features


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def model_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The tensor compared across cut, masked and reloaded models: logits, else the last hidden state."""
    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


def stream_width(model: nn.Module, inputs: dict, block: nn.Module) -> int | None:
    """The last dimension of the hidden states `block` receives (its first tensor argument) in one forward."""
    seen = []

    def record(module, args, kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        seen.append(tensors[0].shape[-1] if tensors else None)

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model_output(model, inputs)
    finally:
        handle.remove()
    return seen[0] if seen else None


# --------------------------------------------------------------------------- dataflow probes
def projection_widths(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Every `Linear` / `Conv1D` of a block: name → (input width, output width)."""
    return {
        name: (in_features(module), out_features(module))
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


@torch.no_grad()
def reach(model: nn.Module, inputs: dict, block: nn.Module, producer: str, channel: int, consumer: str) -> set[int]:
    """The input columns of `consumer` that change when output channel `channel` of `producer` changes.

    One forward with a forward hook adding seeded noise to that channel (noise, not a constant: a
    constant added to a key channel shifts every score of a row alike, which softmax ignores), against
    one without: the columns whose input moved (relative tolerance 1e-6) are the ones the channel reaches."""
    return reach_many(model, inputs, block, producer, channel, [consumer])[consumer]


@torch.no_grad()
def reach_many(
    model: nn.Module,
    inputs: dict,
    block: nn.Module,
    producer: str,
    channel: int,
    consumers: list[str],
    base: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, set[int]]:
    """`reach` into every one of `consumers` at once (two forwards in all; one where `base` holds the consumers'
    inputs of the unchanged forward from an earlier call, which an empty `base` is filled with)."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in consumers}

    def recorder(name):
        return lambda module, args: seen[name].append(args[0].detach().clone())

    def bump(module, args, output):
        output = output.clone()
        generator = torch.Generator().manual_seed(channel)
        noise = torch.randn(output[..., channel].shape, generator=generator, dtype=output.dtype)
        output[..., channel] += noise.to(output.device)
        return output

    handles = [block.get_submodule(name).register_forward_pre_hook(recorder(name)) for name in consumers]
    try:
        if base:
            for name in consumers:
                seen[name] += base[name][:1]
        else:
            model_output(model, inputs)
            if base is not None:
                base.update({name: list(tensors) for name, tensors in seen.items()})
        handles.append(block.get_submodule(producer).register_forward_hook(bump))
        model_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    reached = {}
    for name, pair in seen.items():
        if len(pair) < 2:  # the consumer never runs on these inputs (cross-attention without an encoder): unreached
            reached[name] = set()
            continue
        base, moved = pair[0], pair[1]
        scale = base.abs().max().clamp(min=1e-3)
        changed = ((moved - base).abs() > 1e-6 * scale).reshape(-1, base.shape[-1]).any(0)
        reached[name] = set(torch.nonzero(changed).flatten().tolist())
    return reached


@torch.no_grad()
def parameter_reach(
    model: nn.Module, inputs: dict, block: nn.Module, parameter: str, dim: int, index: int, consumer: str
) -> set[int]:
    """The input columns of `consumer` that change when entry `index` along `dim` of `parameter` (a tensor of the
    block) changes by seeded noise: `reach` for a parameter rather than a projection's output."""
    seen: list[torch.Tensor] = []
    handle = block.get_submodule(consumer).register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    tensor = block.get_parameter(parameter)
    entry = tensor.narrow(dim, index, 1)
    original = entry.clone()
    try:
        model_output(model, inputs)
        noise = torch.randn(entry.shape, generator=torch.Generator().manual_seed(index), dtype=entry.dtype)
        entry.add_(noise.to(entry.device))
        model_output(model, inputs)
    finally:
        entry.copy_(original)
        handle.remove()
    if len(seen) < 2:
        return set()
    base, moved = seen[0], seen[1]
    scale = base.abs().max().clamp(min=1e-3)
    changed = ((moved - base).abs() > 1e-6 * scale).reshape(-1, base.shape[-1]).any(0)
    return set(torch.nonzero(changed).flatten().tolist())


@torch.no_grad()
def modules_run(model: nn.Module, inputs: dict, block: nn.Module, names: list[str]) -> set[str]:
    """Which of the block's modules `names` run in one forward on `inputs`."""
    ran: set[str] = set()
    handles = [
        block.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: ran.add(name)) for name in names
    ]
    try:
        model_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ran


def output_of(model, inputs, module: nn.Module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, output: seen.append(output))
    model_output(model, inputs)
    handle.remove()
    return seen[0] if seen else None


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def adds_to_stream(model, inputs, block: nn.Module, name: str) -> bool:
    """Whether `name`'s output reaches the block's output unchanged: the block computes `h + name(...)`.

    A random offset `δ` added to the projection's output must move the block's output by exactly `δ`
    (relative error below 1e-5); a norm after the MLP (Gemma-2's `post_feedforward_layernorm`), a scale
    or a parallel branch summed later fails the test. The removed-layer and stream repairs rely on it.
    """
    outputs, offset = [], {}

    def shift(module, args, output):
        if "delta" not in offset:
            offset["delta"] = torch.randn(output.shape, generator=torch.Generator().manual_seed(0), dtype=output.dtype)
        return output + offset["delta"] if offset.get("on") else output

    capture = block.register_forward_hook(lambda m, a, output: outputs.append(_first_tensor(output)))
    handle = block.get_submodule(name).register_forward_hook(shift)
    try:
        model_output(model, inputs)
        offset["on"] = True
        model_output(model, inputs)
    finally:
        handle.remove()
        capture.remove()
    if len(outputs) != 2 or outputs[0].shape != offset["delta"].shape:
        return False
    moved = outputs[1] - outputs[0]
    return bool((moved - offset["delta"]).abs().max() <= 1e-5 * offset["delta"].abs().max())
