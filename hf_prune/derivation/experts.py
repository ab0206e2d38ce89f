"""Find the routed experts of a mixture-of-experts MLP on a tiny instance (issue 16), as `derive` finds heads.

With `H` the hidden size, in the first block holding routed experts:

* the *experts module*: the one module whose 3-D parameters share their first dimension `E` (the experts)
  and that has a router beside it (hybrid models' 3-D convolution kernels have none);
* the *router*: beside it (under the same parent, the MoE module), the one module with a weight `[E, H]`
  (its output width is the expert count), with its bias and buffers of `E` entries if it has them; a shared
  expert's gate (`[1, H]`) and the shared expert's projections have other shapes and are never routed experts;
* the widths: of each expert tensor's two other dimensions, the one that is not `H`; the smallest is the
  expert width `I`. The one 3-D tensor of width `I` is the down projection (the consumer); tensors (and
  biases) of width `2I` hold gate and up rows, paired by halves (`n`, `I + n`) or interleaved (`2n`,
  `2n + 1`): the pairing is the one whose rows of neuron 1, given noise, change the output only through
  column 1 of the down projection (one forward with that column zeroed, one without);
* the config fields: of the integer fields equal to `E` (or `I`), the one that, lowered by one, gives a model
  (built on the meta device) whose expert tensors have `E - 1` experts (width `I - 1`).

A *per-expert module list* (an `nn.ModuleList` of `E ≥ 2` modules with the same parameter names and shapes,
with a router `[E, H]` beside it, as transformers 4's Mixtral or remote-code DeepSeek models have) is found the
same way when no fused tensors are: the router width is the number of entries; in an entry, the projection
writing `H` is the down projection (width `I`), the other tensors of width `I` (separate gate and up) or `2I`
(fused, paired as above) its producers; the count field is the one that, lowered by one, shortens the router.

Nothing here is used before `verify` has cut the tiny model and compared it with the masked reference.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import DerivedAdapterError
from ..groups.base import out_features
from ..groups.experts import ExpertLayout, ExpertTensor


def _output(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        output = model(**inputs)
    return output.logits if getattr(output, "logits", None) is not None else output[0]


def expert_modules(block: nn.Module, hidden: int) -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """Every module of `block` holding 3-D parameters that share their first dimension `E` and have a router
    `[E, H]` beside them: name → (E, router parameters, router buffers). Convolutions' 3-D kernels (hybrid
    models' `conv1d`) have no router and are left out."""
    owners: dict[str, list[str]] = {}
    for name, parameter in block.named_parameters():
        if parameter.dim() == 3:
            owners.setdefault(name.rpartition(".")[0], []).append(name)
    found = {}
    for owner, names in owners.items():
        counts = {block.get_parameter(name).shape[0] for name in names}
        if len(counts) != 1:
            continue
        experts = counts.pop()
        try:
            found[owner] = (experts, *_router(block, owner.rpartition(".")[0], owner, experts, hidden))
        except DerivedAdapterError:
            continue
    return found


def expert_lists(block: nn.Module, hidden: int) -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """Every `nn.ModuleList` of `block` with at least two entries of the same parameter names and shapes and a
    router `[E, H]` beside it (`E` the entries): name → (E, router parameters, router buffers)."""
    found = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or not name:
            continue
        shapes = [[(n, tuple(p.shape)) for n, p in entry.named_parameters()] for entry in module]
        if not shapes[0] or any(shape != shapes[0] for shape in shapes):
            continue
        try:
            found[name] = (len(module), *_router(block, name.rpartition(".")[0], name, len(module), hidden))
        except DerivedAdapterError:
            continue
    return found


def expert_block(layers: nn.ModuleList, hidden: int) -> int | None:
    """The index of the first block holding routed experts (fused 3-D tensors, or a per-expert module list,
    with a router), if any."""
    return next(
        (index for index, block in enumerate(layers) if expert_modules(block, hidden) or expert_lists(block, hidden)),
        None,
    )


def derive_experts(model: nn.Module, inputs: dict, layers_name: str, hidden: int) -> ExpertLayout:
    """The expert layout of the model's blocks, or a `DerivedAdapterError` saying what was not found."""
    layers = model.get_submodule(layers_name)
    index = expert_block(layers, hidden)
    if index is None:
        three_d = sorted({n.rpartition(".")[0] for b in layers for n, p in b.named_parameters() if p.dim() == 3})
        raise DerivedAdapterError(
            f"no module of 3-D (fused) expert tensors [E, ...], nor a list of E expert modules, with a router weight "
            f"[E, {hidden}] beside it (3-D parameters in {three_d or 'none'})"
        )
    block = layers[index]
    found = expert_modules(block, hidden)
    per_expert = not found
    found = found or expert_lists(block, hidden)
    if len(found) != 1:
        raise DerivedAdapterError(f"several expert modules with a router in one block {sorted(found)}")
    experts_module, (experts, router_parameters, router_buffers) = next(iter(found.items()))
    moe_module = experts_module.rpartition(".")[0]
    if per_expert:
        tensors = _entry_tensors(block, experts_module, hidden)
    else:
        tensors = _tensors(block, experts_module, experts, hidden)
    writers = _writers(block, moe_module, experts_module, router_parameters[0], hidden)
    layout = ExpertLayout(
        moe_module, router_parameters, experts_module, tensors, router_buffers, writers=writers, per_expert=per_expert
    )
    layout = _pair(model, inputs, block, layout)
    prefix = f"{layers_name}.{index}."
    counted = router_parameters[0] if per_expert else tensors[0].parameter  # a list's entries: the router's rows
    count_field = _config_field(model, prefix + counted, 0, experts)
    consumer = next(t for t in layout.tensors if t.consumer)
    down = layout.names(block, consumer)[0]
    width = block.get_parameter(down).shape[consumer.width_dim]
    width_field = _config_field(model, prefix + down, consumer.width_dim, width)
    return dataclasses.replace(layout, count_field=count_field, width_field=width_field)


def _writers(block: nn.Module, moe_module: str, experts_module: str, router_weight: str, hidden: int) -> tuple:
    """Projections of the MoE module beside the routed experts that write its `H`-wide output (a shared expert's
    down projection): with the experts' down projections, what a removed MoE block stops adding."""
    scope = block.get_submodule(moe_module) if moe_module else block
    prefix = f"{moe_module}." if moe_module else ""
    return tuple(
        prefix + name
        for name, module in scope.named_modules()
        if isinstance(module, nn.Linear)
        and module.out_features == hidden
        and not (prefix + name).startswith(experts_module + ".")
        and prefix + name + ".weight" != router_weight
    )


def moe_output(model: nn.Module, inputs: dict, layers_name: str, layout: ExpertLayout) -> str:
    """How the MoE module's caller reads its output: "zeros" (a tensor) or "zeros_and_none" (a pair, GPT-OSS's
    `(hidden, router_scores)`), for the stand-in of a removed MoE block."""
    layers = model.get_submodule(layers_name)
    block = next(block for block in layers if layout.present(block))
    module = block.get_submodule(layout.moe_module)
    seen = []
    handle = module.register_forward_hook(lambda m, args, output: seen.append(output))
    try:
        _output(model, inputs)
    finally:
        handle.remove()
    if isinstance(seen[0], torch.Tensor):
        return "zeros"
    if isinstance(seen[0], tuple) and len(seen[0]) == 2 and isinstance(seen[0][0], torch.Tensor):
        return "zeros_and_none"
    raise DerivedAdapterError(f"{layout.moe_module} returns {type(seen[0]).__name__}, not a tensor or a pair")


def _router(block: nn.Module, moe_module: str, experts_module: str, experts: int, hidden: int):
    """The router's weight `[E, H]` and bias `[E]` (if any): the one such module beside the experts; and its
    buffers with one entry per expert (DeepSeek-style score corrections)."""
    scope = block.get_submodule(moe_module) if moe_module else block
    prefix = f"{moe_module}." if moe_module else ""
    found = [
        prefix + name
        for name, parameter in scope.named_parameters()
        if name.endswith("weight")
        and tuple(parameter.shape) == (experts, hidden)
        and not (prefix + name).startswith(experts_module + ".")
    ]
    if len(found) != 1:
        raise DerivedAdapterError(
            f"expected one router weight [{experts}, {hidden}] beside {experts_module}, found {found or 'none'}"
        )
    weight = found[0]
    router = block.get_submodule(weight.rpartition(".")[0])
    prefix = weight.rpartition(".")[0] + "."
    parameters = [
        prefix + n for n, t in router.named_parameters(recurse=False) if prefix + n != weight and _row(t, experts)
    ]
    buffers = [prefix + n for n, t in router.named_buffers(recurse=False) if _row(t, experts)]
    return (weight, *parameters), tuple(buffers)


def _row(tensor: torch.Tensor, experts: int) -> bool:
    return tensor.dim() == 1 and tensor.shape[0] == experts


def _tensors(block: nn.Module, experts_module: str, experts: int, hidden: int) -> tuple[ExpertTensor, ...]:
    """Every parameter of the experts module with its width dimension and width (by shape)."""
    shaped = []
    for name, parameter in block.get_submodule(experts_module).named_parameters():
        full = f"{experts_module}.{name}"
        if parameter.shape[0] != experts or parameter.dim() not in (2, 3):
            raise DerivedAdapterError(f"{full} {tuple(parameter.shape)} is not indexed by the {experts} experts")
        others = [(dim, size) for dim, size in enumerate(parameter.shape) if dim > 0 and size != hidden]
        if parameter.dim() == 3 and len(others) != 1 or parameter.dim() == 2 and len(others) > 1:
            raise DerivedAdapterError(f"{full} {tuple(parameter.shape)}: cannot tell its width from the hidden size")
        shaped.append((full, parameter.dim(), others[0] if others else (None, None)))
    widths = {size for _, _, (_, size) in shaped if size is not None}
    if not widths:
        raise DerivedAdapterError(f"no expert width in {experts_module}")
    width = min(widths)
    consumers = [name for name, dims, (_, size) in shaped if dims == 3 and size == width]
    if len(consumers) != 1 or widths - {width, 2 * width}:
        raise DerivedAdapterError(
            f"expected one down projection of width {width} and fused gate/up tensors of width {2 * width} in "
            f"{experts_module}, found widths {sorted(widths)}; unfused gate and up tensors are not derived yet"
        )
    tensors = []
    for name, _, (dim, size) in shaped:
        pairs = "halves" if size == 2 * width else None
        tensors.append(ExpertTensor(name, dim, pairs, consumer=name == consumers[0]))
    tensors.sort(key=lambda t: (t.width_dim is None, t.consumer))  # producers first, output biases last
    return tuple(tensors)


def _entry_tensors(block: nn.Module, experts_module: str, hidden: int) -> tuple[ExpertTensor, ...]:
    """Every parameter of one entry of a per-expert module list, relative to the entry, with its width dimension:
    the `Linear` (or `Conv1D`) writing `H` is the down projection (the consumer); the other tensors of width `I`
    (separate gate and up projections) or `2I` (fused, paired by `_pair`) are its producers."""
    entry = block.get_submodule(experts_module)[0]
    shaped = []
    for name, parameter in entry.named_parameters():
        module_name, _, attribute = name.rpartition(".")
        module = entry.get_submodule(module_name)
        others = [(dim, size) for dim, size in enumerate(parameter.shape) if size != hidden]
        if parameter.dim() not in (1, 2) or len(others) > 1:
            raise DerivedAdapterError(
                f"{experts_module}.0.{name} {tuple(parameter.shape)}: cannot tell its width from the hidden size"
            )
        writes = isinstance(module, (nn.Linear, Conv1D)) and out_features(module) == hidden
        shaped.append((name, others[0] if others else (None, None), writes and attribute == "weight"))
    consumers = [(name, dim, size) for name, (dim, size), consumer in shaped if consumer and size is not None]
    if len(consumers) != 1:
        raise DerivedAdapterError(
            f"expected one projection writing the hidden size {hidden} in {experts_module}.0, found "
            f"{[name for name, *_ in consumers] or 'none'}"
        )
    down, _, width = consumers[0]
    widths = {size for _, (_, size), _ in shaped if size is not None}
    if widths - {width, 2 * width}:
        raise DerivedAdapterError(
            f"expected producers of width {width} (or fused {2 * width}) beside the down projection {down} in "
            f"{experts_module}.0, found widths {sorted(widths)}"
        )
    tensors = [
        ExpertTensor(name, dim, "halves" if size == 2 * width else None, consumer=name == down)
        for name, (dim, size), _ in shaped
    ]
    tensors.sort(key=lambda t: (t.width_dim is None, t.consumer))  # producers first, output biases last
    return tuple(tensors)


@torch.no_grad()
def _pair(model: nn.Module, inputs: dict, block: nn.Module, layout: ExpertLayout) -> ExpertLayout:
    """The layout with the gate/up pairing that the dataflow confirms (see the module docstring)."""
    consumer = next(t for t in layout.tensors if t.consumer)
    paired = [t for t in layout.tensors if t.pairs]
    if not paired:
        return layout
    width = layout.width(block)
    downs = [block.get_parameter(name) for name in layout.names(block, consumer)]
    saved = {
        name: block.get_parameter(name).detach().clone() for t in layout.tensors for name in layout.names(block, t)
    }
    base = _output(model, inputs)
    generator = torch.Generator().manual_seed(0)
    neuron = 1
    try:
        for pairs in ("halves", "interleaved"):
            tensors = tuple(dataclasses.replace(t, pairs=pairs) if t.pairs else t for t in layout.tensors)
            candidate = dataclasses.replace(layout, tensors=tensors)
            moved = []
            for zero_column in (True, False):
                for name, value in saved.items():
                    block.get_parameter(name).copy_(value)
                base_here = base
                if zero_column:
                    for down in downs:
                        down.narrow(consumer.width_dim, neuron, 1).zero_()
                    base_here = _output(model, inputs)
                for piece in candidate.neuron_slices(block, width, neuron):
                    if not piece.consumer:
                        tensor = block.get_parameter(piece.parameter)
                        rows = tensor.narrow(piece.dim, piece.start, piece.stop - piece.start)
                        rows.add_(torch.randn(rows.shape, generator=generator).to(rows))
                moved.append(not torch.allclose(_output(model, inputs), base_here, rtol=0, atol=1e-6))
            if moved == [False, True]:
                return candidate
    finally:
        for name, value in saved.items():
            block.get_parameter(name).copy_(value)
    raise DerivedAdapterError(
        f"no pairing of the gate and up rows of {[t.parameter for t in paired]} (halves or interleaved) reaches "
        f"only column {neuron} of {consumer.parameter}"
    )


def _config_field(model: nn.Module, parameter: str, dim: int, value: int) -> str | None:
    """The integer config field equal to `value` which, lowered by one, lowers `parameter`'s dimension `dim`."""
    config = model.config
    names = [key for key, v in config.to_dict().items() if v == value and type(v) is int]
    names.sort(key=lambda key: 0 if "expert" in key or "moe" in key else 1)
    for name in names:
        candidate = copy.deepcopy(config)
        setattr(candidate, name, value - 1)
        try:
            with torch.device("meta"):
                shape = type(model)(candidate).get_parameter(parameter).shape
        except Exception:  # the class refuses the changed value: not this field
            continue
        if shape[dim] == value - 1:
            return name
    return None
