"""Scores → what to keep. `uniform`: the same count in every layer, so a standard config fits.

Two steps: `resolve_targets` turns the config's amounts into counts and validates them against
the model's shapes (cheap, before any calibration), then `build_plan` removes the lowest-scored
groups: whole layers first, then branches among the remaining layers, then KV groups, query
heads inside the kept groups, and MLP neurons inside the branches that remain.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import GROUP_KINDS, PruningConfig, count_of
from .criteria import Criterion, ScoringContext
from .errors import InvalidPruningTargetError
from .groups import ArchitectureAdapter, GroupKind
from .groups.base import TRANSFORMER_KINDS
from .plan import LayerPlan, PruningPlan


@dataclass(frozen=True)
class Targets:
    """How many groups of each kind go: layers and branches model-wide, the rest per layer."""

    layers: int
    attention_branches: int
    mlp_branches: int
    kv_groups: dict[int, int]
    heads_per_group: dict[int, int]
    #: MHA layers: heads removed per layer (each head is its own KV group).
    mha_heads: dict[int, int]
    neurons: dict[int, int]
    #: what the units of `neurons` are: MLP neurons, or a convolutional block's inner channels.
    neuron_kind: GroupKind = "neurons"

    def kinds(self) -> set[GroupKind]:
        """The group kinds that need a criterion."""
        kinds = {kind for kind in ("layers", "attention_branches", "mlp_branches") if getattr(self, kind)}
        for kind, counts in (
            ("kv_groups", self.kv_groups),
            ("heads", self.heads_per_group),
            ("heads", self.mha_heads),
            (self.neuron_kind, self.neurons),
        ):
            if any(counts.values()):
                kinds.add(kind)
        return kinds


def _block_count(kind: str, amount, total: int) -> int:
    count = count_of(amount, total)
    if amount and count >= total:
        label = kind.replace("_", " ")
        raise InvalidPruningTargetError(
            f"{kind}={amount!r} removes all {total} {'layers' if kind == 'layers' else 'remaining ' + label}; "
            f"remove at most {total - 1}."
        )
    return count


def _head_counts(config: PruningConfig, layer: int, attention) -> tuple[int, int]:
    """(KV groups removed, query heads removed per kept group); MHA heads go as KV groups."""
    per_group = attention.heads_per_group
    if per_group == 1:
        if config.kv_groups:
            raise InvalidPruningTargetError(
                f"kv_groups={config.kv_groups!r}: layer {layer} uses multi-head attention (one query head per KV head); "
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
            f"{name}={amount!r} rounds to 0 of {total} per layer; the smallest valid fraction is {0.5 / total:.3g} (1 of {total})."
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


def _neuron_count(name: str, amount, layer: int, total: int) -> int:
    count = count_of(amount, total)
    unit = "neurons" if name == "mlp_neurons" else "channels"
    if amount and count >= total:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} removes all {total} {unit} of layer {layer}; remove at most {total - 1}"
            + (", or use mlp_branches to drop whole MLPs." if name == "mlp_neurons" else ".")
        )
    if amount and count == 0:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} rounds to 0 of {total} {unit}; the smallest valid fraction is {0.5 / total:.3g}."
        )
    return count


#: Group kind → the PruningConfig amount that removes it.
_AMOUNT_OF_KIND = {
    "heads": "attention_heads",
    "kv_groups": "kv_groups",
    "neurons": "mlp_neurons",
    "attention_branches": "attention_branches",
    "mlp_branches": "mlp_branches",
    "layers": "layers",
    "channels": "channels",
}


def resolve_targets(plan: PruningPlan, config: PruningConfig, adapter: ArchitectureAdapter | None = None) -> Targets:
    """Counts for every kind, validated on every layer's shape; raises before any work is done.

    `adapter` says which kinds the family prunes (transformer kinds when not given).
    """
    neuron_kind: GroupKind = adapter.neuron_kind if adapter else "neurons"
    kinds = adapter.kinds if adapter else TRANSFORMER_KINDS
    neuron_amount = _AMOUNT_OF_KIND[neuron_kind]
    for kind, name in _AMOUNT_OF_KIND.items():
        if getattr(config, name) and kind not in kinds:
            raise InvalidPruningTargetError(
                f"{name}={getattr(config, name)!r}: this model cannot prune {kind}; set {name}=0 and use "
                f"{', '.join(_AMOUNT_OF_KIND[k] for k in sorted(kinds))}."
                + (" Transformers: channels (the hidden width) is not supported yet." if kind == "channels" else "")
            )
    total = len(plan.layers)
    layers = _block_count("layers", config.layers, total)
    with_attention = sum(1 for p in plan.layers if p.keep_attention) - layers
    with_mlp = sum(1 for p in plan.layers if p.keep_mlp) - layers
    kv_groups: dict[int, int] = {}
    heads: dict[int, int] = {}
    mha_heads: dict[int, int] = {}
    neurons: dict[int, int] = {}
    for layer_plan in plan.layers:
        attention, size = layer_plan.geometry.attention, layer_plan.geometry.intermediate_size
        if attention and (config.kv_groups or config.attention_heads):
            groups, per_group = _head_counts(config, layer_plan.layer, attention)
            (mha_heads if attention.heads_per_group == 1 else kv_groups)[layer_plan.layer] = groups
            heads[layer_plan.layer] = per_group
        amount = getattr(config, neuron_amount)
        if size and amount:
            neurons[layer_plan.layer] = _neuron_count(neuron_amount, amount, layer_plan.layer, size)
    return Targets(
        layers,
        _block_count("attention_branches", config.attention_branches, max(with_attention, 0)),
        _block_count("mlp_branches", config.mlp_branches, max(with_mlp, 0)),
        kv_groups,
        heads,
        mha_heads,
        neurons,
        neuron_kind,
    )


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Positions of the `count` lowest scores (ties broken by position)."""
    return set(torch.argsort(scores, stable=True)[:count].tolist())


def _scores(context: ScoringContext, criterion: Criterion, index: int, kind: GroupKind) -> torch.Tensor:
    groups = context.adapter.groups(context.layer(index), index, kind)
    return criterion.score(context, groups) if groups else torch.empty(0, dtype=torch.float64)


def _remove_blocks(context: ScoringContext, criteria: Mapping[str, Criterion], plan: PruningPlan, targets: Targets) -> None:
    if targets.layers:
        scores = torch.cat([_scores(context, criteria["layers"], p.layer, "layers") for p in plan.layers])
        for position in _lowest(scores, targets.layers):
            plan.layers[position].keep_layer = False
    for kind, flag in (("attention_branches", "keep_attention"), ("mlp_branches", "keep_mlp")):
        count = getattr(targets, kind)
        if not count:
            continue
        candidates = [p for p in plan.layers if p.keep_layer and getattr(p, flag)]
        scores = torch.cat([_scores(context, criteria[kind], p.layer, kind) for p in candidates])
        for position in _lowest(scores, count):
            setattr(candidates[position], flag, False)


def _select_heads(context: ScoringContext, criteria: Mapping[str, Criterion], plan: LayerPlan, targets: Targets) -> None:
    attention = plan.geometry.attention
    heads = targets.heads_per_group.get(plan.layer, 0)
    groups, kind = targets.kv_groups.get(plan.layer, 0), "kv_groups"
    if plan.layer in targets.mha_heads:
        groups, kind = targets.mha_heads[plan.layer], "heads"
    if groups:
        removed = _lowest(_scores(context, criteria[kind], plan.layer, "kv_groups"), groups)
        plan.kv_heads = tuple(j for j in plan.kv_heads if j not in removed)
        plan.query_heads = tuple(h for j in plan.kv_heads for h in attention.heads_of_group(j))
    if heads:
        scores = _scores(context, criteria["heads"], plan.layer, "heads")
        kept = []
        for j in plan.kv_heads:
            members = list(attention.heads_of_group(j))
            removed = _lowest(scores[members], heads)
            kept += [h for position, h in enumerate(members) if position not in removed]
        plan.query_heads = tuple(kept)


def build_plan(context: ScoringContext, criteria: Mapping[str, Criterion], targets: Targets) -> PruningPlan:
    """Keep the best-scored groups, the same count per layer (`criteria` maps kind → criterion)."""
    plan = PruningPlan.keep_all(context.model, context.adapter)
    _remove_blocks(context, criteria, plan, targets)
    for layer_plan in plan.layers:
        if not layer_plan.keep_layer:
            continue
        if layer_plan.keep_attention and layer_plan.geometry.attention:
            _select_heads(context, criteria, layer_plan, targets)
        count = targets.neurons.get(layer_plan.layer, 0)
        if layer_plan.keep_mlp and count:
            kind = targets.neuron_kind
            removed = _lowest(_scores(context, criteria[kind], layer_plan.layer, kind), count)
            layer_plan.neurons = tuple(n for n in layer_plan.neurons if n not in removed)
    return plan


def plan_for(model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig, criterion: Criterion) -> PruningPlan:
    """A uniform plan for `config`'s amounts with one data-free criterion for every kind
    (dry runs, inspection, gradual steps)."""
    targets = resolve_targets(PruningPlan.keep_all(model, adapter), config, adapter)
    return build_plan(ScoringContext(model, adapter), dict.fromkeys(GROUP_KINDS, criterion), targets)
