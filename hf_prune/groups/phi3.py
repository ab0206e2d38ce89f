"""Phi-3: fused `qkv_proj` = [q | k | v] and fused `gate_up_proj` = [gate | up]."""

import copy

from torch import nn

from .base import ArchitectureAdapter, AttentionGeometry, TensorSlice, in_features, input_slices, output_slices
from .registry import register_adapter


@register_adapter
class Phi3Adapter(ArchitectureAdapter):
    model_types = ("phi3",)
    layers_path = "layers"
    attention_module = "self_attn"
    mlp_module = "mlp"
    o_proj = "self_attn.o_proj"
    up_proj = "mlp.gate_up_proj"
    down_proj = "mlp.down_proj"
    mlp_adds_to_stream = True

    def attention_geometry(self, layer: nn.Module) -> AttentionGeometry | None:
        if not self.has_branch(layer, "attention"):
            return None
        d = layer.self_attn.head_dim
        num_heads = in_features(layer.self_attn.o_proj) // d
        num_kv_heads = (layer.self_attn.qkv_proj.weight.shape[0] - num_heads * d) // (2 * d)
        return AttentionGeometry(num_heads, num_kv_heads, d)

    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        return output_slices(layer, "self_attn.qkv_proj", head * d, (head + 1) * d) + input_slices(
            layer, self.o_proj, head * d, (head + 1) * d
        )

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        d, q_width, kv_width = (
            geometry.head_dim,
            geometry.num_heads * geometry.head_dim,
            geometry.num_kv_heads * geometry.head_dim,
        )
        key = q_width + kv_head * d
        value = q_width + kv_width + kv_head * d
        return output_slices(layer, "self_attn.qkv_proj", key, key + d) + output_slices(
            layer, "self_attn.qkv_proj", value, value + d
        )

    def neuron_slices(self, layer: nn.Module, intermediate_size: int, neuron: int) -> list[TensorSlice]:
        gate = output_slices(layer, self.up_proj, neuron, neuron + 1)
        up = output_slices(layer, self.up_proj, intermediate_size + neuron, intermediate_size + neuron + 1)
        return gate + up + input_slices(layer, self.down_proj, neuron, neuron + 1)

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        attention = layer.self_attn
        attention.num_key_value_heads = geometry.num_kv_heads
        attention.num_key_value_groups = geometry.heads_per_group
        # Phi3Attention.forward reads `self.config.num_attention_heads`: give it a layer-local config.
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = geometry.num_heads
        attention.config.num_key_value_heads = geometry.num_kv_heads
