"""Routed experts of a mixture-of-experts MLP: which slices one expert, or one neuron of every expert, owns.

Transformers 5 stores a layer's experts fused: 3-D tensors whose dimension 0 indexes the experts
(`gate_up_proj` `[E, 2I, H]` or `[E, H, 2I]`, `down_proj` `[E, H, I]` or `[E, I, H]`, biases `[E, ·]`), read
by a router whose weight (and bias, if any) holds one row per expert. An `ExpertLayout` names these,
relative to the decoder layer; `hf_prune.derivation.experts` reads it from a tiny instance of the family
(router = the module beside the experts whose output width is the expert count; widths by shape; how
gate and up rows pair, by dataflow), never from a per-family table.

Removing expert `e` removes row `e` of the router (and its bias) and index `e` of every expert tensor.
Removing neuron `n` (the same neuron in every expert, so the config's expert width still holds) removes
its gate and up rows and column `n` of the down projection in every expert. Shared experts (always on,
Qwen2-MoE) are dense MLPs beside the router: they are never routed experts.

Some models (transformers 4's Mixtral and Qwen2-MoE, remote-code DeepSeek-style models) keep one module per
expert instead, in an `nn.ModuleList` (`experts.{e}.w1.weight`): `per_expert=True`. Then `tensors` name the
parameters of one entry, relative to it; expert `e`'s slices are its router row and the whole of entry `e`'s
tensors, and the cut drops the entry (`drop_experts`, the list renumbers); neuron `n` is the same neuron of
every entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from .slices import TensorSlice

#: Module attributes holding the expert count, and the expert width, that forward or repr may read.
COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")
WIDTH_ATTRIBUTES = ("intermediate_dim", "intermediate_size", "expert_dim", "moe_intermediate_size")
#: Every expert keeps a multiple of this many neurons: transformers' grouped-GEMM experts kernel
#: (`experts_implementation="grouped_mm"`, the default) needs 16-byte strides, 8 entries in 16-bit floats.
EXPERT_WIDTH_MULTIPLE = 8
#: Config fields naming how many experts each token is routed to.
TOP_K_FIELDS = r"num_experts_per_tok|experts_per_token|moe_top_k|top_k|topk"


@dataclass(frozen=True)
class ExpertTensor:
    """One fused expert tensor, named relative to the layer; dimension 0 indexes the experts (with a per-expert
    module list: one parameter of an entry, named relative to the entry).

    `width_dim` holds the expert width (one index per neuron, `I`) or the gate and up rows (`2I`):
    `pairs` says how, `"halves"` (gate `n`, up `I + n`) or `"interleaved"` (gate `2n`, up `2n + 1`);
    None: no width (an output bias). `consumer`: the down projection, whose width columns a neuron feeds.
    """

    parameter: str
    width_dim: int | None
    pairs: str | None = None
    consumer: bool = False


@dataclass(frozen=True)
class ExpertLayout:
    """Where one family keeps its routed experts (names relative to the decoder layer)."""

    #: the MLP module holding the router and the experts (and any shared expert)
    moe_module: str
    #: the router's parameters with one row per expert (weight `[E, H]`, bias `[E]`)
    router_parameters: tuple[str, ...]
    #: the module holding the fused expert tensors
    experts_module: str
    tensors: tuple[ExpertTensor, ...]
    #: the router's buffers with one entry per expert (score corrections): cut with it, never scored
    router_buffers: tuple[str, ...] = ()
    #: config fields holding the expert count and the expert width (None: not found)
    count_field: str | None = None
    width_field: str | None = None
    #: projections beside the routed experts that write the MoE module's output (a shared expert's down projection)
    writers: tuple[str, ...] = ()
    #: `experts_module` is an `nn.ModuleList` of one module per expert; `tensors` are relative to an entry
    per_expert: bool = False

    @property
    def router(self) -> str:
        return self.router_parameters[0].rpartition(".")[0]

    def present(self, layer: nn.Module) -> bool:
        """Whether `layer` holds routed experts (dense layers of a partly sparse model do not)."""
        try:
            layer.get_parameter(self.router_parameters[0])
            layer.get_submodule(self.experts_module)
        except AttributeError:
            return False
        return True

    def num_experts(self, layer: nn.Module) -> int:
        return layer.get_parameter(self.router_parameters[0]).shape[0]

    def names(self, layer: nn.Module, tensor: ExpertTensor) -> list[str]:
        """The parameter names (relative to the layer) `tensor` stands for: itself, or one per list entry."""
        if not self.per_expert:
            return [tensor.parameter]
        entries = len(layer.get_submodule(self.experts_module))
        return [f"{self.experts_module}.{entry}.{tensor.parameter}" for entry in range(entries)]

    def width(self, layer: nn.Module) -> int:
        """The expert width `I` (neurons per expert), read from the down projection."""
        consumer = next(t for t in self.tensors if t.consumer)
        return layer.get_parameter(self.names(layer, consumer)[0]).shape[consumer.width_dim]

    def expert_slices(self, layer: nn.Module, expert: int) -> list[TensorSlice]:
        """Row `expert` of the router (and its bias) and index `expert` of every expert tensor (a per-expert
        list: the whole of entry `expert`'s tensors)."""
        pieces = [TensorSlice(name, 0, expert, expert + 1) for name in self.router_parameters]
        if not self.per_expert:
            return pieces + [TensorSlice(t.parameter, 0, expert, expert + 1) for t in self.tensors]
        for tensor in self.tensors:
            name = f"{self.experts_module}.{expert}.{tensor.parameter}"
            pieces.append(TensorSlice(name, 0, 0, layer.get_parameter(name).shape[0]))
        return pieces

    def drop_experts(self, layer: nn.Module, removed: list[int]) -> None:
        """A per-expert list without the `removed` entries (the list renumbers the others); fused tensors are
        sliced instead (`expert_slices`)."""
        if self.per_expert:
            experts = layer.get_submodule(self.experts_module)
            for entry in sorted(removed, reverse=True):
                del experts[entry]

    def entry_prefixes(self, experts: list[int]) -> tuple[str, ...]:
        """Name prefixes of the given experts' list entries (none for fused tensors)."""
        return tuple(f"{self.experts_module}.{e}." for e in experts) if self.per_expert else ()

    def buffer_slices(self, expert: int) -> list[TensorSlice]:
        """Entry `expert` of the router's per-expert buffers (surgery cuts them; they hold no parameters)."""
        return [TensorSlice(name, 0, expert, expert + 1) for name in self.router_buffers]

    def neuron_slices(self, layer: nn.Module, width: int, neuron: int) -> list[TensorSlice]:
        """Neuron `neuron` of every expert: its gate and up rows, its down-projection column (the consumer)."""
        slices = []
        for tensor in self.tensors:
            if tensor.width_dim is None:
                continue
            dim = tensor.width_dim
            for name in self.names(layer, tensor):
                if tensor.consumer:
                    slices.append(TensorSlice(name, dim, neuron, neuron + 1, consumer=True))
                elif tensor.pairs == "halves":
                    slices += [
                        TensorSlice(name, dim, neuron, neuron + 1),
                        TensorSlice(name, dim, width + neuron, width + neuron + 1),
                    ]
                elif tensor.pairs == "interleaved":
                    slices.append(TensorSlice(name, dim, 2 * neuron, 2 * neuron + 2))
                else:
                    slices.append(TensorSlice(name, dim, neuron, neuron + 1))
        return slices

    def consumer_slices(self, layer: nn.Module) -> list[TensorSlice]:
        """Everything that writes the MoE module's output: every expert's whole down projection and output bias,
        and the writers beside them (a shared expert's down projection, bias included)."""
        names = [name for t in self.tensors if t.consumer or t.width_dim is None for name in self.names(layer, t)]
        for writer in self.writers:
            names += [f"{writer}.{name}" for name, _ in layer.get_submodule(writer).named_parameters()]
        return [TensorSlice(name, 0, 0, layer.get_parameter(name).shape[0], consumer=True) for name in names]

    def set_sizes(self, layer: nn.Module, old: tuple[int, int], new: tuple[int, int]) -> None:
        """Bring the size attributes of the router and experts modules (`num_experts`, `intermediate_dim`, ...)
        from `old` to `new` (expert count, expert width) after their tensors were sliced."""
        (old_count, old_width), (count, width) = old, new
        for name in {self.moe_module, self.router, self.experts_module}:
            module = layer.get_submodule(name)
            for attribute in COUNT_ATTRIBUTES:
                if getattr(module, attribute, None) == old_count:
                    setattr(module, attribute, count)
        experts = layer.get_submodule(self.experts_module)
        for module in experts if self.per_expert else [experts]:
            for attribute in WIDTH_ATTRIBUTES:
                if getattr(module, attribute, None) == old_width:
                    setattr(module, attribute, width)


def experts_per_token(config: PretrainedConfig) -> int | None:
    """How many experts each token is routed to (`num_experts_per_tok` and its aliases), if the config says."""
    for key, value in config.to_dict().items():
        if re.fullmatch(TOP_K_FIELDS, key) and isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def top_k_field(config: PretrainedConfig) -> str:
    """The config field `experts_per_token` reads (for messages)."""
    return next((key for key in config.to_dict() if re.fullmatch(TOP_K_FIELDS, key)), "num_experts_per_tok")
