"""GPT-NeoX (Pythia): fused `query_key_value` interleaved per head as [q_h | k_h | v_h]."""

from torch import nn
from transformers import PretrainedConfig

from .base import ArchitectureAdapter, AttentionGeometry, LayerGeometry, TensorSlice, input_slices, output_slices
from .registry import register_adapter


@register_adapter
class GPTNeoXAdapter(ArchitectureAdapter):
    model_types = ("gpt_neox",)
    layers_path = "layers"
    attention_module = "attention"
    mlp_module = "mlp"
    head_dim_attribute = "head_size"
    o_proj = "attention.dense"
    up_proj = "mlp.dense_h_to_4h"
    down_proj = "mlp.dense_4h_to_h"
    mlp_adds_to_stream = True

    def _qkv(self, layer: nn.Module, geometry: AttentionGeometry, part: int, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        start = head * 3 * d + part * d
        return output_slices(layer, "attention.query_key_value", start, start + d)

    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        return self._qkv(layer, geometry, 0, head) + input_slices(layer, self.o_proj, head * d, (head + 1) * d)

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        return self._qkv(layer, geometry, 1, kv_head) + self._qkv(layer, geometry, 2, kv_head)

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        """The forward infers the head count from the fused projection's width: nothing to update."""

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # The head size is hidden_size / num_attention_heads here too; the save checks shapes.
        return {"num_attention_heads": geometry.attention.num_heads, "intermediate_size": geometry.intermediate_size}
