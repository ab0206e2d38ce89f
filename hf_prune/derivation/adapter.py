"""`DerivedAdapter`: an adapter whose names come from a verified `Derivation` rather than a hand-written file."""

from __future__ import annotations

import copy
import re

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import DerivedAdapterError
from ..groups.base import (
    ArchitectureAdapter,
    AttentionGeometry,
    LayerGeometry,
    TensorSlice,
    in_features,
    input_slices,
    out_features,
    output_slices,
    renumber_layer,
    replace_module,
)
from .attention import fused_chunks
from .fields import ALIASES, config_field, entry_field, join, sub_config, with_entry
from .mlp import gate_up_rows
from .record import Derivation
from .stacks import fixed_prefix, layer_parts


class DerivedAdapter(ArchitectureAdapter):
    """An adapter whose names come from a verified `Derivation` rather than a hand-written file."""

    def __init__(self, derivation: Derivation, model_type: str):
        self.derivation = derivation
        self.model_types = (model_type,)
        for name in (
            "layers_path",
            "attention_module",
            "mlp_module",
            "q_proj",
            "qkv_proj",
            "qkv_layout",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "gate_up_layout",
            "mlp_width_scale",
            "heads_module",
            "head_dim_attribute",
            "removed_attention_output",
            "removed_mlp_output",
            "mlp_adds_to_stream",
        ):
            setattr(self, name, getattr(derivation, name))
        self.kinds = derivation.kinds
        self.expert_layout = derivation.experts
        self.tied_heads = derivation.tied_heads
        #: kind → why it was refused (shown when a refused kind is asked for)
        self.refused = dict(derivation.refused)

    def shared_head_slices(self, model: nn.Module, kept_heads: tuple[int, ...], num_heads: int) -> list[TensorSlice]:
        """Each removed head's entry of every parameter producing the state the layers share
        (`Derivation.shared_head_parameters`), named from the model root."""
        prefix = self.layers_name(model).removesuffix(self.layers_path)
        removed = sorted(set(range(num_heads)) - set(kept_heads))
        return [
            TensorSlice(prefix + name, dim, head, head + 1)
            for name, dim in self.derivation.shared_head_parameters
            for head in removed
        ]

    def _parallel(self, model: nn.Module) -> list[str]:
        """The qualified names of the parallel lists (`Derivation.parallel_lists`; empty where blocks are whole)."""
        prefix = self.layers_name(model).removesuffix(self.layers_path)
        return [prefix + name for name in self.derivation.parallel_lists]

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Parallel lists: each layer as `stacks.LayerParts` (entry `i` of every list), as derivation read it."""
        names = self._parallel(model)
        return layer_parts(model, names) if names else super().layers(model)

    def layer_parts(self, model: nn.Module, index: int) -> list[nn.Module]:
        names = self._parallel(model)
        return [model.get_submodule(name)[index] for name in names] if names else super().layer_parts(model, index)

    def skip_layer(self, model: nn.Module, index: int) -> list:
        """Parallel lists: the stream entering the first part of layer `index` leaves its last part unchanged."""
        parts = self.layer_parts(model, index)
        if len(parts) == 1:
            return super().skip_layer(model, index)
        stream = {}

        def enter(module, args, kwargs):
            stream["hidden"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))

        def leave(module, args, kwargs, output):
            hidden = stream.pop("hidden")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return [
            parts[0].register_forward_pre_hook(enter, with_kwargs=True),
            parts[-1].register_forward_hook(leave, with_kwargs=True),
        ]

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        """Parallel lists: every list keeps the entries of the kept layers; KV-cache indices (`layer_idx`,
        `layer_id`) of the other lists' entries are renumbered as `surgery.drop_layers` does the blocks'. A module
        attribute named as the count field and holding the count follows it."""
        names = self._parallel(model)
        old = list(self.layers(model))
        key = entry_field(self.derivation.layers_field.rpartition(".")[2])[0] if self.derivation.layers_field else None
        for module in model.modules():  # a copy of the count the forward loops over (XLM's `self.n_layers`)
            if key and type(vars(module).get(key)) is int and vars(module)[key] == len(old):
                setattr(module, key, len(layers))
        if not names:
            return super().set_layers(model, layers)
        kept = [next(i for i, block in enumerate(old) if block.parts()[0] is layer.parts()[0]) for layer in layers]
        for name in names:
            entries = model.get_submodule(name)
            replace_module(model, name, nn.ModuleList(entries[i] for i in kept))
            for new_index, (old_index, entry) in enumerate(zip(kept, model.get_submodule(name))):
                renumber_layer(entry, old_index, new_index)

    def fixed_layers(self, model: nn.Module) -> frozenset[int]:
        """The leading blocks built unlike the rest (`stacks.fixed_prefix`), where verification found that only
        they cannot be removed; and every layer whose removal alone the config class refuses (NeoMME's
        `layer_types` must keep a full-attention layer)."""
        count = len(self.layers(model))
        fixed = set(range(fixed_prefix(self.layers(model)))) if self.derivation.fixed_prefix else set()
        if self.derivation.layers_field is None:
            return frozenset(fixed)
        for index in range(count):
            trial = copy.deepcopy(model.config)
            try:
                self.update_config_for_layers(trial, [i for i in range(count) if i != index])
                type(trial).from_dict(trial.to_dict())
            except Exception:  # the class's own validation: that layer stays
                fixed.add(index)
        return frozenset(fixed)

    def has_branch(self, layer: nn.Module, branch) -> bool:
        """A branch derivation did not resolve (no module or no consumer) is invisible: never touched."""
        name, consumer = (
            (self.attention_module, self.o_proj) if branch == "attention" else (self.mlp_module, self.down_proj)
        )
        consumer = consumer or (self.expert_layout if branch == "mlp" else None)
        return name is not None and consumer is not None and super().has_branch(layer, branch)

    def attention_geometry(self, layer: nn.Module) -> AttentionGeometry | None:
        headed = self.derivation.head_producers
        if (self.q_proj is None and self.qkv_proj is None and not headed) or "heads" not in self.kinds:
            return None  # attention left untouched: its kinds are refused
        if headed:  # one KV head per head (its rows are in the head's chunk of every producer)
            if not self.has_branch(layer, "attention"):
                return None
            n = getattr(self._heads_module(layer), self.derivation.head_count_attribute)
            return AttentionGeometry(n, n, in_features(layer.get_submodule(self.o_proj)) // n)
        d = self.derivation.head_dim
        if d is None:
            geometry = super().attention_geometry(layer)
        elif not self.has_branch(layer, "attention"):
            return None
        else:  # no attribute holds the head size: the derived one
            n = in_features(layer.get_submodule(self.o_proj)) // d
            m = out_features(layer.get_submodule(self.k_proj)) // d if self.k_proj else n
            geometry = AttentionGeometry(n, m, d)
        if geometry is None or self.qkv_proj is None:
            return geometry
        d, n = geometry.head_dim, geometry.num_heads
        m = (out_features(layer.get_submodule(self.qkv_proj)) - n * d) // (2 * d)
        return AttentionGeometry(n, m, d)

    def _qkv(self, layer: nn.Module, geometry: AttentionGeometry, part: int, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        chunk = fused_chunks(self.qkv_layout, geometry.num_heads, geometry.num_kv_heads)[part][head]
        return output_slices(layer, self.qkv_proj, chunk * d, (chunk + 1) * d)

    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        """The query rows and output columns of `head`, and its index in every per-head parameter the layer has
        (`Derivation.head_parameters`)."""
        d, n = geometry.head_dim, geometry.num_heads
        if self.derivation.head_producers:  # headed attention: the head's chunk of rows of every producer
            slices = [
                piece
                for name in self.derivation.head_producers
                for w in [out_features(layer.get_submodule(name)) // n]
                for piece in output_slices(layer, name, head * w, (head + 1) * w)
            ]
            slices += input_slices(layer, self.o_proj, head * d, (head + 1) * d)
        elif self.qkv_proj is None:
            slices = super().query_head_slices(layer, geometry, head)
            slices += [
                s for gate in self.derivation.query_gates for s in output_slices(layer, gate, head * d, (head + 1) * d)
            ]
        else:
            slices = self._qkv(layer, geometry, 0, head) + input_slices(layer, self.o_proj, head * d, (head + 1) * d)
        names = dict(layer.named_parameters())
        slices += [
            s
            for name, dim in self.derivation.head_width_parameters
            for s in [TensorSlice(name, dim, head * d, (head + 1) * d)]
        ]
        return slices + [
            TensorSlice(name, dim, head, head + 1) for name, dim in self.derivation.head_parameters if name in names
        ]

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        if self.derivation.head_producers:  # headed attention: all in the query head's slices
            return []
        if self.qkv_proj is None:
            return super().kv_head_slices(layer, geometry, kv_head)
        return self._qkv(layer, geometry, 1, kv_head) + self._qkv(layer, geometry, 2, kv_head)

    def neuron_slices(self, layer: nn.Module, intermediate_size: int, neuron: int) -> list[TensorSlice]:
        """A fused gate/up projection: the two rows of `neuron` (`mlp.gate_up_rows`) and its down column; the
        neuron's channel of any depthwise convolution between them (`Derivation.neuron_channels`)."""
        names, end = self.derivation.neuron_channels, neuron + 1
        channels = [piece for name in names for piece in output_slices(layer, name, neuron, end)]
        if self.gate_up_layout is None or self.experts_of(layer):
            return super().neuron_slices(layer, intermediate_size, neuron) + channels
        rows = gate_up_rows(self.gate_up_layout, intermediate_size, neuron)
        slices = [s for row in rows for s in output_slices(layer, self.up_proj, row, row + 1)]
        return slices + input_slices(layer, self.down_proj, neuron, neuron + 1) + channels

    def intermediate_size(self, layer: nn.Module) -> int | None:
        if self.experts_of(layer):
            return super().intermediate_size(layer)
        return super().intermediate_size(layer) if self.down_proj and "neurons" in self.kinds else None

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        """The generic head attributes, and a layer-local config copy for forwards that read head counts from it;
        a submodule holding the attention's own head attribute follows it (NeoMME's exclusive self-attention keeps
        its own `num_key_value_groups`)."""
        heads = layer.get_submodule(self.heads_module or self.attention_module)
        before = {
            name: getattr(heads, name) for name in self.head_attributes if type(getattr(heads, name, None)) is int
        }
        super().set_attention_geometry(layer, geometry)
        for module in list(heads.modules())[1:]:
            for name, value in before.items():
                if getattr(module, name, None) == value and type(getattr(module, name)) is int:
                    setattr(module, name, getattr(heads, name))
        for names, value in (
            (ALIASES["num_attention_heads"], geometry.num_heads),
            (ALIASES["num_key_value_heads"], geometry.num_kv_heads),
            (
                self.derivation.width_attributes,
                geometry.num_heads * geometry.head_dim,
            ),
        ):
            for name in names:  # what forwards split or reshape by: n_head (MPT), split_size (GPT-2 style)
                if type(getattr(heads, name, None)) is int:
                    setattr(heads, name, value)
        for name in {self.attention_module, self.heads_module} - {None}:
            module = layer.get_submodule(name)
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig):
                module.config = copy.copy(config)
                for canonical, value, role in (
                    ("num_attention_heads", geometry.num_heads, self.derivation.heads_field),
                    ("num_key_value_heads", geometry.num_kv_heads, self.derivation.kv_heads_field),
                ):
                    field_name = role or config_field(type(config), canonical)
                    if field_name and hasattr(config, entry_field(field_name)[0]):
                        setattr(module.config, *with_entry(config, field_name, value))

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        """The fields holding each pruned shape, named as the config class names them (dotted where the blocks'
        sizes live in a nested config: `text_config.intermediate_size`)."""
        fields, path = {}, self.derivation.config_path
        config = self.derivation.config_of(config)
        attention = geometry.attention
        scale, width = self.mlp_width_scale, geometry.intermediate_size
        values = {"intermediate_size": width * scale if scale and width is not None else None}
        layout = self.expert_layout
        if geometry.experts is not None and layout is not None:  # an MoE layer: the expert count and width
            values = {}
            fields |= {layout.count_field: geometry.experts} if layout.count_field else {}
            fields |= {layout.width_field: geometry.intermediate_size} if layout.width_field else {}
        if attention is not None and "heads" in self.kinds:
            values |= {"num_attention_heads": attention.num_heads, "num_key_value_heads": attention.num_kv_heads}
            if not self.derivation.head_producers:  # headed attention: `o`'s head width, not the config's head_dim
                values["head_dim"] = attention.head_dim
        roles = {
            "num_attention_heads": self.derivation.heads_field,
            "num_key_value_heads": self.derivation.kv_heads_field,
        }
        for canonical, value in values.items():
            name = roles.get(canonical) or config_field(type(config), canonical)
            if name and value is not None and (canonical != "head_dim" or getattr(config, name, None) is not None):
                if canonical == "num_key_value_heads" and getattr(config, entry_field(name)[0], None) is None:
                    continue  # MHA families whose config has no KV field set
                name, value = with_entry(config, name, value)  # one stage's entry (`num_heads[i]`): the whole list
                fields[join(path, name)] = value
        return fields

    def layer_count_field(self, config: PretrainedConfig) -> str:
        """The dotted field counting this stack's layers, as derivation found it (`stacks.find_stack`)."""
        if self.derivation.layers_field is None:
            raise DerivedAdapterError(f"layers of {self.layers_path}: {self.refused.get('layers', 'no count field')}")
        return self.derivation.layers_field

    def update_config_for_layers(self, config: PretrainedConfig, kept_layers: list[int]) -> None:
        """The layer-count field, and every per-layer list (a `*layer*` field as long as the old count) of the
        (nested) config holding it."""
        path, _, name = self.layer_count_field(config).rpartition(".")
        config = sub_config(config, path)
        name, index = entry_field(name)
        if index is not None:  # one stage's blocks, counted by one entry of a per-stage list (`depths[i]`)
            entries = list(getattr(config, name))
            entries[index] = len(kept_layers)
            setattr(config, name, type(getattr(config, name))(entries))
            return
        old_count = getattr(config, name)
        setattr(config, name, len(kept_layers))
        for key, value in list(vars(config).items()):
            if re.search(r"layer|window", key) and isinstance(value, (list, tuple)) and len(value) == old_count:
                setattr(config, key, type(value)(value[i] for i in kept_layers))
        stages = getattr(config, "stage_names", None)
        if isinstance(stages, list) and len(stages) == old_count + 1 and hasattr(config, "out_indices"):
            # a backbone config names the stem and each layer's output: kept outputs follow their layer
            kept = [i for i in config.out_indices or () if i == 0 or i - 1 in kept_layers]
            config.stage_names = stages[: len(kept_layers) + 1]
            indices = [0 if i == 0 else 1 + kept_layers.index(i - 1) for i in kept]
            config.set_output_features_output_indices(None, indices or None)
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = sum(1 for i in kept_layers if i < min(config.max_window_layers, old_count))
