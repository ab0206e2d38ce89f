"""ViT encoders: separate q/k/v/o projections (MHA), plain `fc1`/`fc2` MLP, pre-norm."""

from transformers import PretrainedConfig

from .base import ArchitectureAdapter, LayerGeometry
from .registry import register_adapter


@register_adapter
class ViTAdapter(ArchitectureAdapter):
    model_types = ("vit",)
    layers_path = "layers"
    attention_module = "attention"
    mlp_module = "mlp"
    q_proj = "attention.q_proj"
    k_proj = "attention.k_proj"
    v_proj = "attention.v_proj"
    o_proj = "attention.o_proj"
    up_proj = "mlp.fc1"
    down_proj = "mlp.fc2"
    mlp_adds_to_stream = True

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # ViTAttention reads an explicit `head_dim` from the config when present.
        return {
            "num_attention_heads": geometry.attention.num_heads,
            "head_dim": geometry.attention.head_dim,
            "intermediate_size": geometry.intermediate_size,
        }
