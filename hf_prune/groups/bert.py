"""BERT-style encoders (BERT, RoBERTa): separate q/k/v, post-LayerNorm residual branches.

The LayerNorm after each branch belongs to the layer, not to the branch: a removed branch
leaves `LayerNorm(residual)`, exactly what zeroing the branch's output projection gives.
"""

from torch import nn
from transformers import PretrainedConfig

from .base import ArchitectureAdapter, Branch, LayerGeometry, RemovedBranch, TensorSlice, module_slices, replace_module
from .registry import register_adapter


@register_adapter
class BertAdapter(ArchitectureAdapter):
    model_types = ("bert", "roberta")
    layers_path = "encoder.layer"
    attention_module = "attention"
    heads_module = "attention.self"
    head_dim_attribute = "attention_head_size"
    mlp_module = "intermediate"
    q_proj = "attention.self.query"
    k_proj = "attention.self.key"
    v_proj = "attention.self.value"
    o_proj = "attention.output.dense"
    up_proj = "intermediate.dense"
    down_proj = "output.dense"

    def branch_slices(self, layer: nn.Module, branch: Branch) -> list[TensorSlice]:
        if branch == "attention":
            return module_slices(layer, "attention.self") + module_slices(layer, self.o_proj)
        return module_slices(layer, self.up_proj) + module_slices(layer, self.down_proj)

    def remove_branch(self, layer: nn.Module, branch: Branch) -> None:
        if branch == "attention":
            norm = layer.attention.output.LayerNorm
            replace_module(layer, "attention", RemovedBranch("normed_input_and_none", norm))
        else:
            norm = layer.output.LayerNorm
            replace_module(layer, "intermediate", RemovedBranch("identity"))
            replace_module(layer, "output", RemovedBranch("normed_residual", norm))

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # BERT derives the head size from hidden_size / num_attention_heads: head pruning is
        # expressible only when that ratio still gives the kept head size (the save checks shapes).
        return {
            "num_attention_heads": geometry.attention.num_heads,
            "intermediate_size": geometry.intermediate_size,
        }
