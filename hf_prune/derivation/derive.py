"""Adapters derived from the model itself, for model types without a hand-written one (issue 15).

How: build a tiny random instance of the *same* config class (its defaults, shrunk by one generic
rule: `shrink.py`), then read the adapter's names from that model rather than from a per-family file:

* the layer stack (`stacks.py`): the `ModuleList` of alike blocks whose length a config field counts;
* in its first block, every `nn.Linear` / GPT-2 `Conv1D` with its input and output widths: the attention
  (`attention.py`) and the MLP (`mlp.py`), or the routed experts (`experts.py`);
* dataflow, confirmed by one forward per probe (`probes.reach`): a unit added to output channel `c` of a
  producer must reach exactly the consumer's input columns the layout says. Names are hints for the
  order only (q before k, gate before up), never the evidence.

Nothing derived here is used before `verify.verify` has cut the tiny model with a random
plan of every kind and compared it with the masked reference; kinds that fail are refused with a
`DerivedAdapterError` naming what could not be resolved. Left for later (refused with the typed error
saying what was found): state-space mixers, per-expert module lists.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import PretrainedConfig

from ..errors import DerivedAdapterError
from .adapter import DerivedAdapter
from .attention import derive_attention
from .experts import derive_experts, moe_output
from .fields import ALIASES, config_value, entry_field
from .mlp import derive_mlp
from .probes import first_line, model_output, projection_widths, stream_width
from .record import Derivation
from .shrink import (
    LIST_WIDTH,
    MAX_TINY_PARAMETERS,
    TINY,
    build_tiny,
    changed_fields,
    grown_pixels,
    tiny_config,
    tiny_model_class,
)
from .stacks import find_stack, layer_parts, relative_layers_path

__all__ = [
    "LIST_WIDTH",
    "MAX_TINY_PARAMETERS",
    "TINY",
    "Derivation",
    "DerivedAdapter",
    "build_tiny",
    "changed_fields",
    "derive",
    "first_line",
    "model_output",
    "tiny_config",
    "tiny_model_class",
]


def derive(config_class: type[PretrainedConfig]) -> tuple[Derivation, nn.Module, dict]:
    """Read the adapter's names from a tiny instance of `config_class` (not yet verified)."""
    model, inputs = build_tiny(config_class)
    found = Derivation(config_class)
    stack = find_stack(model, inputs)
    layers_name = stack.name
    found.layers_path, found.config_path = relative_layers_path(model, layers_name), stack.config_path
    found.layers_field = stack.count_field
    found.parallel_lists = tuple(relative_layers_path(model, name) for name in stack.parallel)
    if stack.count_field is None:
        found.refuse({"layers"}, f"no config field counts {layers_name} alone: {stack.shared}")
    block = model.get_submodule(layers_name)[0]
    if stack.parallel:  # layer 0's entry of every parallel list: the attention and the MLP are in different lists
        block = layer_parts(model, list(stack.parallel))[0]
    projections = projection_widths(block)
    config = found.config_of(model.config)
    hidden = config_value(config, "hidden_size")
    if entry_field(stack.count_field or "")[1] is not None or not isinstance(hidden, int):
        hidden = stream_width(model, inputs, block)  # one stage of several widths (`hidden_sizes`): its own
    if not isinstance(hidden, int):
        raise DerivedAdapterError(f"{type(config).__name__}: no hidden-size field ({ALIASES['hidden_size']}).")
    base = copy.deepcopy(found)
    derive_attention(found, model, inputs, block, projections, hidden)
    if "heads" in found.refused and entry_field(found.heads_field or "")[1] is not None and "pixel_values" in inputs:
        # one stage's attention over keys and values reduced by a strided convolution (SegFormer, PVT: `sr`) may
        # see a single key on the tiny pixels, where softmax is constant and the keys reach nothing: larger pixels
        grown = grown_pixels(model, inputs)
        trial = copy.deepcopy(base)
        if grown is not None:
            derive_attention(trial, model, grown, block, projections, hidden)
        if grown is not None and "heads" not in trial.refused:
            found, inputs = trial, grown
    experts = _experts(model.get_submodule(layers_name))
    if experts:
        try:
            found.experts = derive_experts(model, inputs, layers_name, hidden)
            found.mlp_module = found.experts.moe_module
        except Exception as error:  # a probe's forward may fail too: the MoE kinds are refused, never the rest
            reason = str(error) if isinstance(error, DerivedAdapterError) else f"{type(error).__name__}: {error}"
            found.refuse({"neurons", "mlp_branches", "experts"}, f"mixture-of-experts MLP ({experts}): {reason}")
        else:
            try:
                found.removed_mlp_output = moe_output(model, inputs, layers_name, found.experts)
            except DerivedAdapterError as error:
                found.refuse({"mlp_branches"}, f"mixture-of-experts MLP: {error}")
    else:
        derive_mlp(found, model, inputs, block, projections, hidden)
    return found, model, inputs


def _experts(layers: nn.ModuleList) -> str | None:
    """The first module of any block whose name says it holds experts (`experts`, `shared_expert`, ...)."""
    for index, block in enumerate(layers):
        for name, _ in block.named_modules():
            if "expert" in name.rpartition(".")[2].lower():
                return f"{index}.{name}"
    return None
