"""Llama-style decoders: separate q/k/v/o projections (GQA), gated MLP, pre-norm residuals.

Covers Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 and Gemma 3 (per-head q/k norms, which act on
`head_dim` and so stay untouched when heads are removed).
"""

from torch import nn

from .base import ArchitectureAdapter
from .registry import register_adapter


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
    layers_path = "layers"
    attention_module = "self_attn"
    mlp_module = "mlp"
    q_proj = "self_attn.q_proj"
    k_proj = "self_attn.k_proj"
    v_proj = "self_attn.v_proj"
    o_proj = "self_attn.o_proj"
    gate_proj = "mlp.gate_proj"
    up_proj = "mlp.up_proj"
    down_proj = "mlp.down_proj"
    mlp_adds_to_stream = True

    def mlp_writes_stream(self, layer: nn.Module) -> bool:
        """Gemma 3 normalises the MLP output (`post_feedforward_layernorm`) before adding it."""
        return super().mlp_writes_stream(layer) and not hasattr(layer, "post_feedforward_layernorm")
