"""What must be removed together: tensor slices, dependency groups, and the adapter contract.

An architecture adapter knows, for one transformers family, which slices of which parameters
belong to an attention head, a KV group, an MLP neuron, and how to put a pruned layer's modules
back into a consistent state. Everything else (planning, masking, surgery, saving) is generic
and works only through this contract.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..kinds import TRANSFORMER_KINDS, Branch, GroupKind
from .experts import ExpertLayout
from .slices import TensorSlice


@dataclass(frozen=True)
class AttentionGeometry:
    """Head counts of one attention block. Query heads `j*g .. (j+1)*g-1` share KV head `j`."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    def heads_of_group(self, kv_head: int) -> range:
        g = self.heads_per_group
        return range(kv_head * g, (kv_head + 1) * g)


@dataclass(frozen=True)
class LayerGeometry:
    """The prunable shape of one layer; `None` means that branch has been removed.

    In a mixture-of-experts layer `experts` is the routed expert count and `intermediate_size` the width of
    every expert; `experts` is None in a dense layer."""

    attention: AttentionGeometry | None
    intermediate_size: int | None
    experts: int | None = None

    def to_dict(self) -> dict:
        attention = self.attention
        return {
            "num_attention_heads": attention.num_heads if attention else 0,
            "num_key_value_heads": attention.num_kv_heads if attention else 0,
            "head_dim": attention.head_dim if attention else None,
            "intermediate_size": self.intermediate_size or 0,
            "attention": attention is not None,
            "mlp": self.intermediate_size is not None,
        } | ({"num_experts": self.experts} if self.experts is not None else {})

    @classmethod
    def from_dict(cls, data: dict) -> LayerGeometry:
        attention = (
            AttentionGeometry(data["num_attention_heads"], data["num_key_value_heads"], data["head_dim"])
            if data["attention"]
            else None
        )
        return cls(attention, data["intermediate_size"] if data["mlp"] else None, data.get("num_experts"))


@dataclass(frozen=True)
class Group:
    """One prunable unit: its kind, the (original) layer it lives in, its index, its slices."""

    kind: GroupKind
    layer: int
    index: int
    slices: tuple[TensorSlice, ...]


class RemovedBranch(nn.Module):
    """Parameter-free stand-in (but for a kept LayerNorm) for a removed attention or MLP sub-block.

    The layer's own forward keeps running, so the skip connection stays. `output` says what the
    replaced module returned to its caller:
    `"zeros"` (a tensor), `"zeros_and_none"` (attention modules return `(output, weights)`),
    `"identity"` (the input, for a module whose result is ignored downstream),
    `"normed_input_and_none"` / `"normed_residual"` (post-LayerNorm encoders such as BERT, whose
    masked branch is `LayerNorm(residual + 0)`: the LayerNorm after the branch stays).
    """

    OUTPUTS = ("zeros", "zeros_and_none", "identity", "normed_input_and_none", "normed_residual")

    def __init__(self, output: str, norm: nn.Module | None = None):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"output must be one of {self.OUTPUTS}, got {output!r}")
        self.output = output
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if self.output == "zeros":
            return torch.zeros_like(hidden_states)
        if self.output == "zeros_and_none":
            return torch.zeros_like(hidden_states), None
        if self.output == "identity":
            return hidden_states
        if self.output == "normed_input_and_none":
            return self.norm(hidden_states), None
        residual = args[0] if args else kwargs["input_tensor"]
        return self.norm(residual)


class ArchitectureAdapter(ABC):
    """Maps one transformers family to its dependency groups and keeps its modules consistent.

    Subclasses name the layer stack and the projections; the defaults cover separate
    `q/k/v/o` projections and a (gated or plain) MLP held as `nn.Linear` or GPT-2 `Conv1D`.
    Fused projections override the slice methods.
    """

    model_types: ClassVar[tuple[str, ...]]
    #: dotted path of the `ModuleList` of layers, relative to the base model (suffix match).
    layers_path: ClassVar[str]
    attention_module: ClassVar[str]
    mlp_module: ClassVar[str]
    q_proj: ClassVar[str | None] = None
    k_proj: ClassVar[str | None] = None
    v_proj: ClassVar[str | None] = None
    o_proj: ClassVar[str]
    gate_proj: ClassVar[str | None] = None
    up_proj: ClassVar[str]
    down_proj: ClassVar[str]
    #: module (relative to the layer) whose attributes hold the head counts and head size.
    heads_module: ClassVar[str | None] = None
    head_dim_attribute: ClassVar[str] = "head_dim"
    #: How the replaced modules' callers expect their output (see `RemovedBranch`).
    removed_attention_output: ClassVar[str] = "zeros_and_none"
    removed_mlp_output: ClassVar[str] = "zeros"
    #: The group kinds this family can prune; the others are refused before any work.
    kinds: ClassVar[frozenset[GroupKind]] = TRANSFORMER_KINDS
    #: The kind whose units fill `LayerPlan.neurons`: MLP neurons, or a convolutional block's
    #: inner channels (`channels`), which are planned, masked and cut the same way.
    neuron_kind: ClassVar[GroupKind] = "neurons"
    #: Dimension of a layer's input and output that holds the channels (1 for NCHW feature maps).
    stream_channel_dim: ClassVar[int] = -1
    #: Whether the dense model's layers differ in shape by design (convolutional stages): the
    #: format decision then compares the whole model with one its config builds, layer by layer.
    shapes_per_stage: ClassVar[bool] = False
    #: Whether the MLP's output projection adds straight into the residual stream (pre-norm
    #: blocks), so that what removed layers added can be refitted into it (`layer_replacement`).
    mlp_adds_to_stream: ClassVar[bool] = False
    #: Where the routed experts of a mixture-of-experts MLP live (`hf_prune.groups.experts`); None: dense MLPs.
    expert_layout: ClassVar[ExpertLayout | None] = None
    #: Whether head `j` of every layer is one group (per-head state computed once and shared by the layers: T5's
    #: position bias in the first block, MPNet's in the encoder): every kept layer keeps the same heads.
    tied_heads: ClassVar[bool] = False

    def shared_head_slices(self, model: nn.Module, kept_heads: tuple[int, ...], num_heads: int) -> list[TensorSlice]:
        """Slices, named from the model root, of the removed heads' entries in per-head state the layers share
        (`tied_heads`), for layers that keep `kept_heads` of `num_heads`; none by default."""
        return []

    # ----------------------------------------------------------------- layer stack
    def layers_name(self, model: nn.Module) -> str:
        """Qualified name of the model's `ModuleList` of layers (base and task models alike)."""
        for name, module in model.named_modules():
            if isinstance(module, nn.ModuleList) and (
                name == self.layers_path or name.endswith("." + self.layers_path)
            ):
                return name
        raise LookupError(f"{type(model).__name__} has no layer list named '{self.layers_path}'")

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers_name(model))

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        replace_module(model, self.layers_name(model), layers)

    def layer_name(self, model: nn.Module, index: int) -> str:
        """Qualified name of layer `index` (the index into `layers(model)`)."""
        return f"{self.layers_name(model)}.{index}"

    def kept_layer_names(self, model: nn.Module, kept: list[int]) -> list[str]:
        """The qualified names the layers `kept` (original indices, ascending) take once the others
        are dropped (`surgery.drop_layers`), in the order of `kept`."""
        return [f"{self.layers_name(model)}.{position}" for position in range(len(kept))]

    def layer_parts(self, model: nn.Module, index: int) -> list[nn.Module]:
        """The modules that make up layer `index`, in the order the forward runs them: the layer itself, or, where
        a model keeps each layer's parts in parallel lists (XLM's `attentions[i]`, `layer_norm1[i]`, `ffns[i]`,
        `layer_norm2[i]`), each list's entry `index` (derived adapters: `Derivation.parallel_lists`)."""
        return [self.layers(model)[index]]

    def skip_layer(self, model: nn.Module, index: int) -> list:
        """Hooks that make layer `index` pass its input hidden states on unchanged (the masked reference of its
        removal); the caller removes them."""
        return [self.layers(model)[index].register_forward_hook(identity_hook, with_kwargs=True)]

    def fixed_layers(self, model: nn.Module) -> frozenset[int]:
        """Layers that are never removed whole (their heads, neurons and branches still are): those the config
        builds differently by their index, so that a config with fewer layers cannot express their removal.
        None here; derived adapters find them (`derivation.stacks.fixed_prefix`)."""
        return frozenset()

    def layer_entries(self, model: nn.Module) -> dict[int, tuple[str, ...]]:
        """Modules outside the layer stack that the model runs on the hidden states between layer
        `index - 1` and layer `index`, by qualified name, in order (ConvNeXt's downsampling before
        a stage). Transformers run nothing between their layers."""
        return {}

    # ----------------------------------------------------------------- geometry
    def geometry(self, layer: nn.Module) -> LayerGeometry:
        """Read the layer's current shape from its modules (not the config: layers may differ)."""
        experts = self.experts_of(layer)
        return LayerGeometry(
            self.attention_geometry(layer),
            self.intermediate_size(layer),
            experts.num_experts(layer) if experts else None,
        )

    def experts_of(self, layer: nn.Module) -> ExpertLayout | None:
        """The expert layout if this layer's MLP is a (kept) mixture of experts, else None."""
        layout = self.expert_layout
        if layout is None or not self.has_branch(layer, "mlp") or not layout.present(layer):
            return None
        return layout

    def mlp_writes_stream(self, layer: nn.Module) -> bool:
        """Whether this layer's `down_proj` output reaches the residual stream unchanged."""
        return self.mlp_adds_to_stream and self.has_branch(layer, "mlp")

    def has_branch(self, layer: nn.Module, branch: Branch) -> bool:
        name = self.attention_module if branch == "attention" else self.mlp_module
        return not isinstance(layer.get_submodule(name), RemovedBranch)

    def attention_geometry(self, layer: nn.Module) -> AttentionGeometry | None:
        """Head counts from the projections' widths; fused MHA layouts (no `k_proj`) have one KV head per head."""
        if not self.has_branch(layer, "attention"):
            return None
        head_dim = getattr(self._heads_module(layer), self.head_dim_attribute)
        num_heads = in_features(layer.get_submodule(self.o_proj)) // head_dim
        num_kv_heads = out_features(layer.get_submodule(self.k_proj)) // head_dim if self.k_proj else num_heads
        return AttentionGeometry(num_heads, num_kv_heads, head_dim)

    def intermediate_size(self, layer: nn.Module) -> int | None:
        if not self.has_branch(layer, "mlp"):
            return None
        experts = self.experts_of(layer)
        if experts:
            return experts.width(layer)
        return in_features(layer.get_submodule(self.down_proj))

    def _heads_module(self, layer: nn.Module) -> nn.Module:
        return layer.get_submodule(self.heads_module or self.attention_module)

    # ----------------------------------------------------------------- slices
    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        """Rows of the query projection for `head` and the matching input columns of `o_proj`."""
        d = geometry.head_dim
        return output_slices(layer, self.q_proj, head * d, (head + 1) * d) + input_slices(
            layer, self.o_proj, head * d, (head + 1) * d
        )

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        """Rows of the key and value projections for `kv_head` (its query heads are separate groups)."""
        d = geometry.head_dim
        return output_slices(layer, self.k_proj, kv_head * d, (kv_head + 1) * d) + output_slices(
            layer, self.v_proj, kv_head * d, (kv_head + 1) * d
        )

    def neuron_slices(self, layer: nn.Module, intermediate_size: int, neuron: int) -> list[TensorSlice]:
        """Row `neuron` of the gate and up projections, column `neuron` of the down projection (in every
        expert, in a mixture-of-experts layer)."""
        experts = self.experts_of(layer)
        if experts:
            return experts.neuron_slices(layer, intermediate_size, neuron)
        producers = [self.gate_proj, self.up_proj] if self.gate_proj else [self.up_proj]
        slices = [s for name in producers for s in output_slices(layer, name, neuron, neuron + 1)]
        return slices + input_slices(layer, self.down_proj, neuron, neuron + 1)

    def branch_consumer_slices(self, layer: nn.Module, branch: Branch) -> list[TensorSlice]:
        """Everything a branch adds to the residual stream: its output projection, bias included."""
        experts = self.experts_of(layer) if branch == "mlp" else None
        if experts:
            return experts.consumer_slices(layer)
        name = self.o_proj if branch == "attention" else self.down_proj
        return module_slices(layer, name, consumer=True)

    def branch_slices(self, layer: nn.Module, branch: Branch) -> list[TensorSlice]:
        """Every parameter the branch owns (for scoring and parameter counts)."""
        name = self.attention_module if branch == "attention" else self.mlp_module
        return module_slices(layer, name)

    def groups(self, layer: nn.Module, index: int, kind: GroupKind) -> list[Group]:
        """Every group of `kind` in one layer (`index` is the layer's position in the model)."""
        if kind == "layers":
            return [Group(kind, index, 0, tuple(module_slices(layer, "")))]
        if kind in ("attention_branches", "mlp_branches"):
            branch = "attention" if kind == "attention_branches" else "mlp"
            return (
                [Group(kind, index, 0, tuple(self.branch_slices(layer, branch)))]
                if self.has_branch(layer, branch)
                else []
            )
        if kind == "experts":
            experts = self.experts_of(layer)
            count = experts.num_experts(layer) if experts else 0
            return [Group(kind, index, e, tuple(experts.expert_slices(layer, e))) for e in range(count)]
        if kind == self.neuron_kind:
            size = self.intermediate_size(layer)
            return [Group(kind, index, n, tuple(self.neuron_slices(layer, size, n))) for n in range(size or 0)]
        attention = self.attention_geometry(layer)
        if attention is None:
            return []
        if kind == "heads":
            return [
                Group(kind, index, h, tuple(self.query_head_slices(layer, attention, h)))
                for h in range(attention.num_heads)
            ]
        return [  # kv_groups: the KV head and every query head that reads it
            Group(
                kind,
                index,
                j,
                tuple(self.kv_head_slices(layer, attention, j))
                + tuple(s for h in attention.heads_of_group(j) for s in self.query_head_slices(layer, attention, h)),
            )
            for j in range(attention.num_kv_heads)
        ]

    # ----------------------------------------------------------------- module updates
    #: The head attributes `set_attention_geometry` updates on the attention module.
    head_attributes: ClassVar[tuple[str, ...]] = (
        "num_key_value_groups",
        "num_heads",
        "num_attention_heads",
        "num_key_value_heads",
        "all_head_size",
    )

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        """Update the attention module's head attributes (`head_attributes`) after its projections were sliced."""
        attention = self._heads_module(layer)
        if hasattr(attention, "num_key_value_groups"):
            attention.num_key_value_groups = geometry.heads_per_group
        for attribute in ("num_heads", "num_attention_heads"):
            if hasattr(attention, attribute):
                setattr(attention, attribute, geometry.num_heads)
        if hasattr(attention, "num_key_value_heads"):
            attention.num_key_value_heads = geometry.num_kv_heads
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = geometry.num_heads * geometry.head_dim

    def set_expert_geometry(self, layer: nn.Module, old: LayerGeometry, new: LayerGeometry) -> None:
        """Update the router's and experts' size attributes after their tensors were sliced."""
        self.expert_layout.set_sizes(layer, (old.experts, old.intermediate_size), (new.experts, new.intermediate_size))

    def remove_branch(self, layer: nn.Module, branch: Branch) -> None:
        """Replace a sub-block by a parameter-free stand-in; the skip connection stays."""
        name = self.attention_module if branch == "attention" else self.mlp_module
        output = self.removed_attention_output if branch == "attention" else self.removed_mlp_output
        replace_module(layer, name, RemovedBranch(output))

    # ----------------------------------------------------------------- config
    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        """Standard config fields that describe a model whose every layer has `geometry` (the GQA
        families' names; families that name or derive them differently override this). A dotted name
        is a nested config's field (`set_config_field`)."""
        attention = geometry.attention
        return {
            "num_attention_heads": attention.num_heads,
            "num_key_value_heads": attention.num_kv_heads,
            "head_dim": attention.head_dim,
            "intermediate_size": geometry.intermediate_size,
        }

    def stream_config_fields(self, model: nn.Module) -> dict:
        """Config fields read from the whole model's shapes (convolutional stage widths); none here."""
        return {}

    def update_config_for_layers(self, config: PretrainedConfig, kept_layers: list[int]) -> None:
        """Rewrite the layer-count fields after keeping only `kept_layers` (original indices)."""
        old_count = config.num_hidden_layers
        config.num_hidden_layers = len(kept_layers)
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in kept_layers]
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = sum(1 for i in kept_layers if i < min(config.max_window_layers, old_count))


# --------------------------------------------------------------------- helpers
def is_conv1d(module: nn.Module) -> bool:
    return isinstance(module, Conv1D)


def out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if is_conv1d(module) else module.weight.shape[0]


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def identity_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """A removed layer's output: its input hidden states, in the container the layer returns (tuple or list)."""
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden_states, *output[1:])
    if isinstance(output, list):  # OpenAI GPT's blocks return a list
        return [hidden_states, *output[1:]]
    return hidden_states


def output_slices(layer: nn.Module, name: str, start: int, stop: int) -> list[TensorSlice]:
    """Output rows `[start, stop)` of a projection (weight and bias)."""
    module = layer.get_submodule(name)
    slices = [TensorSlice(f"{name}.weight", 1 if is_conv1d(module) else 0, start, stop)]
    if getattr(module, "bias", None) is not None:
        slices.append(TensorSlice(f"{name}.bias", 0, start, stop))
    return slices


def input_slices(layer: nn.Module, name: str, start: int, stop: int) -> list[TensorSlice]:
    """Input columns `[start, stop)` of a consuming projection."""
    module = layer.get_submodule(name)
    return [TensorSlice(f"{name}.weight", 0 if is_conv1d(module) else 1, start, stop, consumer=True)]


def module_slices(layer: nn.Module, name: str, consumer: bool = False) -> list[TensorSlice]:
    module = layer.get_submodule(name)
    return [
        TensorSlice(f"{name}.{parameter_name}" if name else parameter_name, 0, 0, parameter.shape[0], consumer)
        for parameter_name, parameter in module.named_parameters()
    ]


def set_config_field(config: PretrainedConfig, name: str, value) -> None:
    """Set a field `config_fields` names; a dotted name (`text_config.intermediate_size`) is a nested config's."""
    path, _, key = name.rpartition(".")
    for part in path.split(".") if path else ():
        config = getattr(config, part)
    setattr(config, key, value)


def renumber_layer(layer: nn.Module, old_index: int, new_index: int) -> None:
    """Give a kept block its new position: the KV cache is indexed by `layer_idx` (GPT-Neo: `layer_id`), so
    after a removal `generate()` must see 0..n-1."""
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = new_index
        if type(getattr(module, "layer_id", None)) is int and module.layer_id == old_index:
            module.layer_id = new_index


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attribute = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, attribute, new)


def channels_last(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A module's input with its channels in the last dimension (convolutions read NCHW)."""
    return x.movedim(1, -1) if isinstance(module, nn.Conv2d) else x


def matrix_view(weight: torch.Tensor) -> torch.Tensor:
    """A consumer weight as (outputs × input channels): a convolution's (O, I, kh, kw) becomes
    (O·kh·kw, I), one row per output channel and kernel tap."""
    return weight.movedim(1, -1).reshape(-1, weight.shape[1]) if weight.dim() == 4 else weight
