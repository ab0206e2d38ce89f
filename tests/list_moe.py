"""A remote-code-style mixture of experts with one module per expert in an `nn.ModuleList`.

Transformers 5.23 has no causal LM with this layout (its MoE families fuse the experts into 3-D tensors; only the
encoder-decoder Switch Transformers and NLLB-MoE keep per-expert modules, in an `nn.ModuleDict`), but transformers
4's Mixtral and Qwen2-MoE had it, and remote-code MoE models (DeepSeek-V2/V3, ...) still ship it: a router
`gate = Linear(H, E)`, `experts = ModuleList(E × MLP(w1, w2, w3))`, softmax, top-k, renormalised weights, each
expert called on the tokens routed to it. Here on transformers 5's Mixtral attention and decoder layers, registered
with the Auto classes as model type `list_moe` (as `trust_remote_code` would register it).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM


class ListMoeConfig(MixtralConfig):
    model_type = "list_moe"


class ListMoeExpert(nn.Module):
    """One expert: `w2(silu(w1 x) · w3 x)` (transformers 4's `MixtralBlockSparseTop2MLP`)."""

    def __init__(self, config: ListMoeConfig):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(hidden_states)) * self.w3(hidden_states))


class ListMoeBlock(nn.Module):
    """Router, top-k of the softmax, renormalised weights; each expert runs on the tokens routed to it."""

    def __init__(self, config: ListMoeConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList([ListMoeExpert(config) for _ in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden)
        weights = torch.softmax(self.gate(hidden_states).float(), dim=-1)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(hidden_states.dtype)
        output = torch.zeros_like(hidden_states)
        mask = nn.functional.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for expert in range(self.num_experts):
            slot, tokens = torch.where(mask[expert])
            if tokens.numel():
                routed = self.experts[expert](hidden_states[tokens]) * weights[tokens, slot, None]
                output.index_add_(0, tokens, routed)
        return output.reshape(batch, length, hidden)


class ListMoeForCausalLM(MixtralForCausalLM):
    config_class = ListMoeConfig
    config: ListMoeConfig

    def __init__(self, config: ListMoeConfig):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp = ListMoeBlock(config)
        self.post_init()


AutoConfig.register(ListMoeConfig.model_type, ListMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ListMoeConfig, ListMoeForCausalLM, exist_ok=True)
