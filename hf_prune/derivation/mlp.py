"""Each block's MLP: producers `H → I` (one: plain, two: gated), the down projection `I → H`, with `I` the
intermediate-size field (or, without one, the one width the shapes show); each producer's neuron must reach only
its own down-projection column."""

from __future__ import annotations

import torch

from .attention import common_parent, hinted
from .fields import ALIASES, config_value
from .probes import adds_to_stream, output_of, reach
from .record import Derivation


def derive_mlp(found: Derivation, model, inputs, block, projections, hidden: int) -> None:
    size = config_value(found.config_of(model.config), "intermediate_size")
    mlp_kinds = {"neurons", "mlp_branches"}
    if not isinstance(size, int):  # a width the class derives (4·H, mlp_ratio·H): read from the shapes
        widths = {i for n, (i, o) in projections.items() if o == hidden and i != hidden and n != found.o_proj}
        widths = [x for x in widths if 1 <= sum(i == hidden and o == x for i, o in projections.values()) <= 2]
        if len(widths) != 1:
            found.refuse(
                mlp_kinds,
                f"no intermediate-size field ({ALIASES['intermediate_size']}), and the shapes of "
                f"{type(block).__name__} show no one MLP width ({sorted(widths)})",
            )
            return
        size = widths[0]
    producers = [n for n, (i, o) in projections.items() if i == hidden and o == size]
    consumers = [n for n, (i, o) in projections.items() if i == size and o == hidden]
    fused = [n for n, (i, o) in projections.items() if i == hidden and o == 2 * size]
    if len(consumers) != 1 or len(producers) not in (1, 2):
        detail = f"; fused gate/up projection {fused[0]} (not derived yet)" if fused else ""
        found.refuse(
            mlp_kinds,
            f"expected one or two projections {hidden}→{size} and one {size}→{hidden} in {type(block).__name__}, "
            f"found {producers} and {consumers}{detail}",
        )
        return
    down = consumers[0]
    for name in producers:  # a neuron of each producer reaches only its own down-projection column
        reached = reach(model, inputs, block, name, 1, down)
        if reached != {1}:
            found.refuse(mlp_kinds, f"neuron 1 of {name} reaches columns {sorted(reached)} of {down}, not only 1")
            return
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
