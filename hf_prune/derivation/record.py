"""`Derivation`: what derivation found on the tiny instance, and each kind it refused with the reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PretrainedConfig

from ..groups.experts import ExpertLayout
from ..kinds import EXPERT_KINDS, TRANSFORMER_KINDS, GroupKind
from .fields import sub_config


@dataclass
class Derivation:
    """What derivation found on the tiny instance; `refused` holds each kind it could not resolve and why."""

    config_class: type[PretrainedConfig]
    layers_path: str = ""
    #: the dotted config field counting the layers (`stacks.find_stack`; None: `layers` is refused)
    layers_field: str | None = None
    #: the parallel lists whose entry `i` together make up layer `i` (`stacks.Stack.parallel`, relative like
    #: `layers_path`, in the order the forward runs them; empty: each block of `layers_path` is a whole layer)
    parallel_lists: tuple[str, ...] = ()
    #: whether the leading blocks built unlike the rest (`stacks.fixed_prefix`) are kept whole, since removing
    #: the first block fails verification and removing any other passes
    fixed_prefix: bool = False
    #: the dotted path of the (nested) config whose fields size the blocks ("" : the model's own config)
    config_path: str = ""
    #: the config fields holding this stack's query and KV head counts, where they are not the canonical ones
    #: (`fields.role_field`: Whisper's decoder stack → `decoder_attention_heads`)
    heads_field: str | None = None
    kv_heads_field: str | None = None
    attention_module: str | None = None
    mlp_module: str | None = None
    q_proj: str | None = None
    #: a fused q/k/v projection and its `FUSED_LAYOUTS` layout (instead of q_proj, k_proj, v_proj)
    qkv_proj: str | None = None
    qkv_layout: str | None = None
    k_proj: str | None = None
    #: per-head gates of the attention output (`H → n·d` beside the query: Beam's `gate_proj`), cut like the query
    query_gates: tuple[str, ...] = ()
    v_proj: str | None = None
    o_proj: str | None = None
    gate_proj: str | None = None
    up_proj: str | None = None
    down_proj: str | None = None
    #: depthwise convolutions over the MLP's neurons (channel `n` goes with neuron `n`: `mlp._per_channel`)
    neuron_channels: tuple[str, ...] = ()
    #: a fused gate/up projection (`up_proj`, no `gate_proj`): its `mlp.GATE_UP_LAYOUTS` row layout
    gate_up_layout: str | None = None
    #: the intermediate-size field's value per neuron (2: it counts a fused projection's rows; None: the width
    #: was read from the shapes, the field does not hold it)
    mlp_width_scale: int | None = 1
    heads_module: str | None = None
    head_dim_attribute: str = "head_dim"
    #: the head size, where no attribute holds it (forwards that split by `width // n_head`)
    head_dim: int | None = None
    #: "headed" attention (no q/k/v layout: multi-head latent attention): every projection whose rows split evenly
    #: into one chunk per head that reaches only its head's columns of `o_proj` (`attention.headed_attention`);
    #: its head count is the integer attribute `head_count_attribute` of `heads_module`
    head_producers: tuple[str, ...] = ()
    head_count_attribute: str | None = None
    #: parameters of the attention module (not its projections) with one dimension per query head, as (name in
    #: the block, dimension): T5-style relative position buckets, attention sinks, per-head biases and kernels
    head_parameters: tuple[tuple[str, int], ...] = ()
    #: whether head `j` of every layer is one group (`verify.tie_heads`): per-head state computed once is shared by
    #: the layers (T5's position bias in the first block, MPNet's, LayoutLMv3's and CPM-Ant's outside the blocks),
    #: so every layer keeps the same heads
    tied_heads: bool = False
    #: the parameters outside the blocks producing that shared state, one entry per head along the dimension given
    #: (MPNet's `encoder.relative_attention_bias.weight` columns, LayoutLMv3's `rel_pos_bias` rows), named like
    #: `layers_path` (below the base model); sliced with the heads the layers keep
    shared_head_parameters: tuple[tuple[str, int], ...] = ()
    #: parameters of the attention module with one dimension of the query width `n·d`, `d` entries per head
    #: (DeBERTa's `q_bias`, `v_bias`), as (name in the block, dimension)
    head_width_parameters: tuple[tuple[str, int], ...] = ()
    #: attention attributes holding the query width `n·d` that forwards split or reshape by (`attention.py`)
    width_attributes: tuple[str, ...] = ("split_size", "all_head_size")
    removed_attention_output: str = "zeros_and_none"
    removed_mlp_output: str = "zeros"
    #: whether the MLP's down-projection output is added to the residual stream unchanged (`adds_to_stream`)
    mlp_adds_to_stream: bool = False
    #: the routed experts' layout (mixture-of-experts MLPs, `experts.py`)
    experts: ExpertLayout | None = None
    refused: dict[str, str] = field(default_factory=dict)
    #: kind → how the verification's vanilla save went ("vanilla", or "loader: <reason>")
    formats: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def kinds(self) -> frozenset[GroupKind]:
        claimed = TRANSFORMER_KINDS | (EXPERT_KINDS if self.experts else frozenset())
        return frozenset(kind for kind in claimed if kind not in self.refused)

    def config_of(self, config: PretrainedConfig) -> PretrainedConfig:
        """The (nested) config whose fields size the pruned blocks."""
        return sub_config(config, self.config_path)

    def refuse(self, kinds, reason: str) -> None:
        for kind in kinds:
            self.refused.setdefault(kind, reason)
