"""A config's amounts or budget → validated per-layer counts, before any calibration runs.

Method notes and sources: docs/methods.md §5.1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ..errors import InvalidPruningTargetError
from ..evaluation import flops_per_token, parameter_count
from ..groups import ArchitectureAdapter, GroupKind
from ..groups.experts import EXPERT_WIDTH_MULTIPLE, experts_per_token, top_k_field
from ..kinds import AMOUNT_OF_KIND, BLOCK_KINDS, GROUP_KINDS, STAGE_KINDS, count_of
from ..plan import PruningPlan
from .base import Counts
from .costs import CostUnit, UnitCosts, unit_costs
from .registry import get_allocation

if TYPE_CHECKING:
    from ..config import PruningConfig


@dataclass(frozen=True)
class Budget:
    """What the uniform counts remove, in `unit`s; `global` and `adaptive` spend the same amount."""

    unit: CostUnit
    context: int
    costs: dict[int, UnitCosts]


@dataclass(frozen=True)
class RemovalCounts:
    """A config's amounts or budget resolved on the model: blocks removed model-wide, the uniform per-layer
    counts, and how to spread them (the user's budget is the only "target"; this is what it comes to)."""

    layers: int
    attention_branches: int
    mlp_branches: int
    counts: Counts
    budget: Budget
    allocation: str = "uniform"
    protected: frozenset[int] = field(default_factory=frozenset)
    #: layers never removed whole (`ArchitectureAdapter.fixed_layers`); their other groups are pruned as usual
    fixed: frozenset[int] = field(default_factory=frozenset)
    round_to: int = 1
    #: what the units of `counts.neurons` are: MLP neurons, or a convolutional block's inner channels.
    neuron_kind: GroupKind = "neurons"
    #: stage → stream channels removed there (convolutional families' `stage_channels`).
    stage_channels: dict[int, int] = field(default_factory=dict)

    def kinds(self) -> set[GroupKind]:
        """The group kinds that need a criterion."""
        kinds = {kind for kind in BLOCK_KINDS | STAGE_KINDS if getattr(self, kind)}
        return kinds | self.counts.kinds(self.neuron_kind)


def _block_count(kind: str, amount, total: int, candidates: int) -> int:
    count = count_of(amount, total)
    if amount and count >= total:
        label = kind.replace("_", " ")
        raise InvalidPruningTargetError(
            f"{kind}={amount!r} removes all {total} {'layers' if kind == 'layers' else 'remaining ' + label}; "
            f"remove at most {total - 1}."
        )
    if count > candidates:
        raise InvalidPruningTargetError(
            f"{kind}={amount!r} removes {count}, but only {candidates} are outside protected_layers; "
            "remove fewer or protect fewer layers."
        )
    return count


def _head_counts(config: PruningConfig, layer: int, attention) -> tuple[int, int]:
    """(KV groups removed, query heads removed per kept group); MHA heads go as KV groups."""
    per_group = attention.heads_per_group
    if per_group == 1:
        if config.kv_groups:
            raise InvalidPruningTargetError(
                f"kv_groups={config.kv_groups!r}: layer {layer} uses multi-head attention (one query head per "
                "KV head); "
                "use attention_heads to remove heads."
            )
        amount, total, name, unit = config.attention_heads, attention.num_heads, "attention_heads", "heads"
    else:
        amount, total, name, unit = config.kv_groups, attention.num_kv_heads, "kv_groups", "KV groups"
    groups = count_of(amount, total)
    if amount and groups >= total:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} removes all {total} {unit} of layer {layer}; the largest valid value is "
            f"{total - 1} (or a fraction below {(total - 0.5) / total:.3g})."
        )
    if amount and groups == 0:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} rounds to 0 of {total} per layer; the smallest valid fraction is "
            f"{0.5 / total:.3g} (1 of {total})."
        )
    if per_group == 1 or not config.attention_heads:
        return groups, 0
    heads = count_of(config.attention_heads, per_group)
    if heads == 0:
        raise InvalidPruningTargetError(
            f"attention_heads={config.attention_heads!r} rounds to 0 of the {per_group} query heads in each KV group; "
            f"the smallest valid fraction is {0.5 / per_group:.3g} (1 head per group)."
        )
    if heads >= per_group:
        raise InvalidPruningTargetError(
            f"attention_heads={config.attention_heads!r} removes all {per_group} query heads of each KV group; the "
            f"largest valid value is {per_group - 1} (or a fraction below {(per_group - 0.5) / per_group:.3g}). "
            "To remove whole groups use kv_groups."
        )
    return groups, heads


def rounded_neurons(removed: int, total: int, round_to: int) -> int:
    """`removed` adjusted so that the kept width is a multiple of `round_to` (at least one multiple)."""
    if round_to == 1 or not removed:
        return removed
    kept = max(round_to, round((total - removed) / round_to) * round_to)
    return max(total - kept, 0)


def _neuron_count(config: PruningConfig, name: str, layer: int, total: int, round_to: int | None = None) -> int:
    """Units removed from one layer by the amount `name` (`mlp_neurons`, or `channels` on
    convolutional families), keeping a multiple of `round_to` (default: the config's)."""
    round_to = round_to or config.round_to
    amount = getattr(config, name)
    unit = "neurons" if name == "mlp_neurons" else "channels"
    count = count_of(amount, total)
    if amount and count >= total:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} removes all {total} {unit} of layer {layer}; remove at most {total - 1}"
            + (", or use mlp_branches to drop whole MLPs." if name == "mlp_neurons" else ".")
        )
    if amount and count == 0:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} rounds to 0 of {total} {unit}; the smallest valid fraction is {0.5 / total:.3g}."
        )
    rounded = rounded_neurons(count, total, round_to)
    if count and not rounded:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} with round_to={round_to} keeps all {total} {unit} of layer "
            f"{layer}; remove more or use a smaller round_to."
        )
    return rounded


def _expert_count(config: PruningConfig, layer: int, total: int, top_k: int | None, top_k_name: str) -> int:
    """Routed experts removed from one mixture-of-experts layer; at least `top_k` (the experts every token is
    routed to) must stay."""
    amount = config.experts
    count = count_of(amount, total)
    if count == 0:
        raise InvalidPruningTargetError(
            f"experts={amount!r} rounds to 0 of the {total} experts of layer {layer}; the smallest valid fraction "
            f"is {0.5 / total:.3g} (1 expert)."
        )
    kept = total - count
    if kept < max(top_k or 1, 1):
        largest = total - max(top_k or 1, 1)
        raise InvalidPruningTargetError(
            f"experts={amount!r} keeps {kept} of the {total} experts of layer {layer}, but every token is routed to "
            f"{top_k} ({top_k_name}); remove at most {largest}"
            + (f" (a fraction below {(largest + 0.5) / total:.3g})." if isinstance(amount, float) else ".")
        )
    return count


def _check_kinds(config: PruningConfig, adapter: ArchitectureAdapter) -> None:
    for kind in GROUP_KINDS:
        name = AMOUNT_OF_KIND[kind]
        if getattr(config, name) and kind not in adapter.kinds:
            raise InvalidPruningTargetError(
                f"{name}={getattr(config, name)!r}: this model cannot prune {kind}; set {name}=0 and use "
                f"{', '.join(AMOUNT_OF_KIND[k] for k in sorted(adapter.kinds))}."
                + (" Transformers: channels (the hidden width) is not supported yet." if kind == "channels" else "")
            )


def _protected(config: PruningConfig, total: int) -> frozenset[int]:
    for index in config.protected_layers:
        if not -total <= index < total:
            raise InvalidPruningTargetError(
                f"protected_layers={config.protected_layers!r}: layer {index} does not exist; the model has {total} "
                f"layers (0 to {total - 1}, or -{total} to -1 from the end)."
            )
    return frozenset(index % total for index in config.protected_layers)


def _amount_counts(
    config: PruningConfig,
    plan: PruningPlan,
    protected: frozenset[int],
    neuron_kind: GroupKind,
    model_config=None,
) -> Counts:
    counts = Counts()
    neuron_amount = AMOUNT_OF_KIND[neuron_kind]
    for layer_plan in plan.layers:
        if layer_plan.layer in protected:
            continue
        attention, size = layer_plan.geometry.attention, layer_plan.geometry.intermediate_size
        if attention and (config.kv_groups or config.attention_heads):
            groups, per_group = _head_counts(config, layer_plan.layer, attention)
            (counts.mha_heads if attention.heads_per_group == 1 else counts.kv_groups)[layer_plan.layer] = groups
            counts.heads_per_group[layer_plan.layer] = per_group
        experts = layer_plan.geometry.experts
        if size and getattr(config, neuron_amount):
            # inside routed experts the kept width stays a multiple of EXPERT_WIDTH_MULTIPLE (grouped GEMM kernels)
            round_to = math.lcm(config.round_to, EXPERT_WIDTH_MULTIPLE) if experts else config.round_to
            counts.neurons[layer_plan.layer] = _neuron_count(config, neuron_amount, layer_plan.layer, size, round_to)
        if size and experts and config.experts:
            top_k = experts_per_token(model_config) if model_config is not None else None
            name = top_k_field(model_config) if model_config is not None else "num_experts_per_tok"
            counts.experts[layer_plan.layer] = _expert_count(config, layer_plan.layer, experts, top_k, name)
    return counts


def _stage_channel_counts(config: PruningConfig, model: nn.Module, adapter: ArchitectureAdapter) -> dict[int, int]:
    """Stream channels removed per stage: the same fraction (or count) of every stage's width.

    Only the uniform allocation (the stream groups cross layers, which the per-layer allocations do
    not model) and the `lstsq` repair of every stream consumer (`repair/stream.py`) or none.
    `protected_layers` name layers; a stream spans all the blocks of its stage, so they do not apply.
    """
    amount = config.stage_channels
    if not amount:
        return {}
    if config.allocation != "uniform":
        raise InvalidPruningTargetError(
            f"stage_channels={amount!r} removes the same share of every stage's stream; allocation="
            f"{config.allocation!r} cannot spread it. Use allocation='uniform' (the default) with stage_channels."
        )
    if config.reconstruct not in ("none", "lstsq"):
        raise InvalidPruningTargetError(
            f"stage_channels={amount!r}: reconstruct={config.reconstruct!r} cannot repair stream channels (a "
            "convolution's per-tap refit has no per-output constant or re-selection); "
            "use reconstruct='lstsq' or 'none'."
        )
    counts = {}
    for stage in range(len(adapter.stages(model))):
        width = adapter.stream_width(model, stage)
        count = count_of(amount, width)
        if count >= width:
            raise InvalidPruningTargetError(
                f"stage_channels={amount!r} removes all {width} stream channels of stage {stage}; remove at most "
                f"{width - 1}"
                + (f" (a fraction below {(width - 0.5) / width:.3g})." if isinstance(amount, float) else ".")
            )
        counts[stage] = count
    if not any(counts.values()):
        smallest = min(adapter.stream_width(model, stage) for stage in counts)
        raise InvalidPruningTargetError(
            f"stage_channels={amount!r} rounds to 0 channels in every stage; the smallest valid fraction is "
            f"{0.5 / smallest:.3g}."
        )
    return counts


def _budget_amount(config: PruningConfig, model: nn.Module, costs: dict[int, UnitCosts]) -> float:
    """What the budget target asks to remove, in its unit."""
    if config.sparsity:
        return config.sparsity * sum(c.prunable for c in costs.values())
    if config.target_params:
        present, name, value = parameter_count(model), "target_params", config.target_params
    else:
        present, name, value = flops_per_token(model, context=config.seq_len), "target_flops", config.target_flops
    if value >= present:
        raise InvalidPruningTargetError(
            f"{name}={value:,} is not below the model's present {present:,}; give a smaller target."
        )
    return float(present - value)


def _budget_counts(
    config: PruningConfig, model: nn.Module, costs: dict[int, UnitCosts], protected: frozenset[int]
) -> Counts:
    """Per-layer counts removing the budget uniformly: in every unprotected layer the same share of
    its heads, routed experts and neurons: attention in whole units, then (parameter budgets on
    mixture-of-experts layers) the same share of the experts, as many as `num_experts_per_tok` allows, and
    the rest of the layer's share in neurons (inside every expert that stays). A FLOPs budget removes no
    experts: a token runs as many experts whichever stay, so an expert saves only its router row's FLOPs."""
    name = config.budget_target
    amount = _budget_amount(config, model, costs)
    open_layers = {index: c for index, c in costs.items() if index not in protected}
    share = amount / max(sum(c.prunable for c in open_layers.values()), 1.0)
    counts = Counts()
    removed = 0.0
    for index, c in open_layers.items():
        attention = min(round(share * c.attention_units), max(c.attention_units - 1, 0))
        experts = min(round(share * c.num_experts), c.num_experts - c.min_experts) if c.experts_hold_neurons else 0
        rest = share * c.prunable - attention * c.kv_group - experts * c.expert
        neuron = c.neuron_without(experts)
        round_to = math.lcm(config.round_to, EXPERT_WIDTH_MULTIPLE) if c.num_experts else config.round_to
        # At least the layer's share (never short of the budget), then down to a multiple of round_to.
        neurons = min(max(math.ceil(rest / neuron - 1e-9), 0), c.num_neurons - 1) if c.num_neurons else 0
        if neurons and round_to > 1:
            kept = max(round_to, (c.num_neurons - neurons) // round_to * round_to)
            neurons = max(c.num_neurons - kept, 0)
        if c.attention_units:
            (counts.mha_heads if c.heads_per_group == 1 else counts.kv_groups)[index] = attention
        if c.num_neurons:
            counts.neurons[index] = neurons
        if experts:
            counts.experts[index] = experts
        removed += attention * c.kv_group + experts * c.expert + neurons * neuron
    if removed < 0.98 * amount:
        raise InvalidPruningTargetError(
            f"{name}={getattr(config, name)!r} asks to remove {amount:,.0f} "
            f"{'FLOPs per token' if config.target_flops else 'parameters'}, "
            f"but every unprotected layer keeping one KV group and one neuron"
            f"{' (and num_experts_per_tok experts)' if any(c.num_experts for c in open_layers.values()) else ''} "
            f"allows only {removed:,.0f}; ask for less{' or protect fewer layers' if protected else ''}."
        )
    if not removed:
        raise InvalidPruningTargetError(
            f"{name}={getattr(config, name)!r} is too small to remove a single head or neuron."
        )
    return counts


def resolve_counts(model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig) -> RemovalCounts:
    """Counts for every kind, validated on every layer's shape; raises before any work is done."""
    get_allocation(config.allocation).validate(config)
    _check_kinds(config, adapter)
    plan = PruningPlan.keep_all(model, adapter)
    total = len(plan.layers)
    protected = _protected(config, total)
    open_plans = [p for p in plan.layers if p.layer not in protected]
    fixed = adapter.fixed_layers(model) if config.layers else frozenset()
    layers = _block_count("layers", config.layers, total, sum(p.layer not in fixed for p in open_plans))
    with_attention = sum(1 for p in open_plans if p.keep_attention) - layers
    with_mlp = sum(1 for p in open_plans if p.keep_mlp) - layers
    unit: CostUnit = "flops" if config.target_flops else "params"
    modules = adapter.layers(model)
    model_config = getattr(model, "config", None)
    costs = {
        p.layer: unit_costs(adapter, modules[p.layer], p.layer, unit, config.seq_len, model_config)
        for p in plan.layers
    }
    if config.budget_target and config.allocation != "uniform" and any(p.geometry.experts for p in plan.layers):
        name = config.budget_target
        raise InvalidPruningTargetError(
            f"{name}={getattr(config, name)!r} with allocation={config.allocation!r}: on mixture-of-experts models "
            "a budget is spread uniformly (experts go in the same number from every layer, which changes what a "
            "neuron inside them is worth, and the cross-layer allocations do not model that); use "
            "allocation='uniform', or give the amounts (e.g. experts=0.25, mlp_neurons=0.25)."
        )
    counts = (
        _budget_counts(config, model, costs, protected)
        if config.budget_target
        else _amount_counts(config, plan, protected, adapter.neuron_kind, model_config)
    )
    return RemovalCounts(
        layers=layers,
        attention_branches=_block_count(
            "attention_branches", config.attention_branches, max(with_attention, 0), max(with_attention, 0)
        ),
        mlp_branches=_block_count("mlp_branches", config.mlp_branches, max(with_mlp, 0), max(with_mlp, 0)),
        counts=counts,
        budget=Budget(unit, config.seq_len, costs),
        allocation=config.allocation,
        protected=protected,
        fixed=fixed,
        round_to=config.round_to,
        neuron_kind=adapter.neuron_kind,
        stage_channels=_stage_channel_counts(config, model, adapter),
    )
