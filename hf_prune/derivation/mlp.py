"""Each block's MLP: producers `H → I` (one: plain, two: gated, or one fused gate/up `H → 2I`), the down projection
`I → H`, with `I` the intermediate-size field (or half of it, where the field counts the fused rows; or, without
one that fits, the one width the shapes show); each producer's neuron must reach only its own down-projection
column, and the fused rows of neuron `n` (`GATE_UP_LAYOUTS`) only column `n`. A depthwise convolution over the
`I` neurons between them (SegFormer's Mix-FFN) is per neuron: its channel `n` goes with neuron `n`."""

from __future__ import annotations

import torch

from .attention import common_parent, hinted
from .fields import ALIASES, config_value, join
from .probes import adds_to_stream, output_of, reach
from .record import Derivation

#: Row layouts of a fused gate/up projection `H → 2I`, as the rows holding neuron `n`: "halves" [gate | up] (rows
#: `n`, `I + n`: GLM, ModernBERT, Moshi), "interleaved" (rows `2n`, `2n + 1`).
GATE_UP_LAYOUTS = ("halves", "interleaved")


def gate_up_rows(layout: str, width: int, neuron: int) -> tuple[int, int]:
    """The two rows of a fused gate/up projection that feed neuron `neuron` of `width`."""
    return (neuron, width + neuron) if layout == "halves" else (2 * neuron, 2 * neuron + 1)


def _shape_widths(found: Derivation, projections: dict, hidden: int) -> list[int]:
    """MLP widths the shapes show: inputs of `→ H` projections (not attention's output) that one or two `H →`
    projections produce, or one fused `H → 2·width` projection."""
    widths = {i for n, (i, o) in projections.items() if o == hidden and i != hidden and n != found.o_proj}
    return sorted(
        x
        for x in widths
        if 1 <= sum(i == hidden and o == x for i, o in projections.values()) <= 2
        or sum(i == hidden and o == 2 * x for i, o in projections.values()) == 1
    )


def _fused_layout(model, inputs, block, fused: str, down: str, width: int) -> str:
    """Which of `GATE_UP_LAYOUTS` the dataflow shows: noise in the fused rows that feed neuron 1 reaches only
    column 1 of the down projection; else a sentence saying what it reaches."""
    seen = {}
    for layout in GATE_UP_LAYOUTS:
        rows = gate_up_rows(layout, width, 1)
        seen[layout] = [sorted(reach(model, inputs, block, fused, row, down)) for row in rows]
        if seen[layout] == [[1], [1]]:
            return layout
    return f"rows of neuron 1 reach columns {seen} of {down}, neither layout of {GATE_UP_LAYOUTS}"


def _per_channel(module, width: int) -> bool:
    """A depthwise convolution over the `width` neurons (SegFormer's Mix-FFN between its two projections): each
    neuron's own kernel and bias go with it."""
    return (
        isinstance(module, torch.nn.modules.conv._ConvNd)
        and module.groups == module.in_channels == module.out_channels == width
    )


def derive_mlp(found: Derivation, model, inputs, block, projections, hidden: int) -> None:
    """Producers, down projection and module of the block's MLP; `mlp_width_scale` is the config field's value
    per neuron (2 where the field holds the fused projection's rows, as Moshi's `ffn_dim`)."""
    field = config_value(found.config_of(model.config), "intermediate_size")
    mlp_kinds = {"neurons", "mlp_branches"}
    # the field's value as the width, or as twice it (a fused gate/up's rows); else the width the shapes show
    candidates = [(field, 1), (field // 2, 2)] if isinstance(field, int) else []
    candidates += [(width, None) for width in _shape_widths(found, projections, hidden)]
    if not candidates:
        found.refuse(
            mlp_kinds,
            f"no intermediate-size field ({ALIASES['intermediate_size']}), and the shapes of "
            f"{type(block).__name__} show no one MLP width",
        )
        return
    for size, scale in candidates:  # the first width whose projections fit
        producers = [n for n, (i, o) in projections.items() if i == hidden and o == size]
        consumers = [n for n, (i, o) in projections.items() if i == size and o == hidden]
        fused = [n for n, (i, o) in projections.items() if i == hidden and o == 2 * size]
        if len(consumers) == 1 and (len(producers) in (1, 2) or (not producers and len(fused) == 1)):
            found.mlp_width_scale = scale
            break
    else:
        size = candidates[0][0]
        found.refuse(
            mlp_kinds,
            f"expected one or two projections {hidden}→{size} (or one fused {hidden}→{2 * size}) and one "
            f"{size}→{hidden} in {type(block).__name__}, found {producers}, {fused} and {consumers} "
            f"(widths tried: {[width for width, _ in candidates]})",
        )
        return
    down = consumers[0]
    mlp = common_parent([*(producers or fused), down])
    found.neuron_channels = tuple(
        join(mlp, name) if mlp else name
        for name, module in (block.get_submodule(mlp) if mlp else block).named_modules()
        if _per_channel(module, size)
    )
    if producers:
        for name in producers:  # a neuron of each producer reaches only its own down-projection column
            reached = reach(model, inputs, block, name, 1, down)
            if reached != {1}:
                found.refuse(mlp_kinds, f"neuron 1 of {name} reaches columns {sorted(reached)} of {down}, not only 1")
                return
    else:
        producers = fused
        layout = _fused_layout(model, inputs, block, fused[0], down, size)
        if layout not in GATE_UP_LAYOUTS:
            found.refuse(
                mlp_kinds,
                f"fused gate/up projection {fused[0]} ({hidden}→{2 * size}) in {type(block).__name__}: {layout}",
            )
            return
        found.gate_up_layout = layout
    if len(producers) == 2:
        found.gate_proj, found.up_proj = hinted(producers, "gate")
    else:
        found.up_proj = producers[0]
    found.down_proj = down
    found.mlp_module = common_parent([*producers, down])
    if not found.mlp_module:
        found.refuse({"mlp_branches"}, f"the MLP projections {[*producers, down]} have no module of their own")
        return
    output = output_of(model, inputs, block.get_submodule(found.mlp_module))
    if not isinstance(output, torch.Tensor):
        found.refuse({"mlp_branches"}, f"{found.mlp_module} returns {type(output).__name__}, not a tensor")
    found.mlp_adds_to_stream = adds_to_stream(model, inputs, block, down)
