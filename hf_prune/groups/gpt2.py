"""GPT-2: `Conv1D` projections (weights stored transposed) and a fused `c_attn` = [q | k | v]."""

from torch import nn
from transformers import PretrainedConfig

from .base import ArchitectureAdapter, AttentionGeometry, LayerGeometry, TensorSlice, input_slices, output_slices
from .registry import register_adapter


@register_adapter
class GPT2Adapter(ArchitectureAdapter):
    model_types = ("gpt2",)
    layers_path = "h"
    attention_module = "attn"
    mlp_module = "mlp"
    o_proj = "attn.c_proj"
    up_proj = "mlp.c_fc"
    down_proj = "mlp.c_proj"
    mlp_adds_to_stream = True

    def _qkv(self, layer: nn.Module, geometry: AttentionGeometry, part: int, head: int) -> list[TensorSlice]:
        d, width = geometry.head_dim, geometry.num_heads * geometry.head_dim
        return output_slices(layer, "attn.c_attn", part * width + head * d, part * width + (head + 1) * d)

    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        return self._qkv(layer, geometry, 0, head) + input_slices(layer, self.o_proj, head * d, (head + 1) * d)

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        return self._qkv(layer, geometry, 1, kv_head) + self._qkv(layer, geometry, 2, kv_head)

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        layer.attn.num_heads = geometry.num_heads
        layer.attn.split_size = geometry.num_heads * geometry.head_dim

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # GPT-2 derives the head size from n_embd / n_head, so only uniform MLP pruning
        # (`n_inner`) and layer removal are expressible; the save checks shapes.
        return {"n_head": geometry.attention.num_heads, "n_inner": geometry.intermediate_size}
