"""Scores → what to keep. `uniform`: the same count in every layer, so a standard config fits.

Two steps: `resolve_targets` turns the config's amounts into counts and validates them against
the model's shapes (cheap, before any calibration), then `build_plan` removes the lowest-scored
groups: whole layers first, then branches among the remaining layers, then KV groups, query
heads inside the kept groups, and MLP neurons inside the branches that remain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .config import GROUP_KINDS, PruningConfig, count_of
from .criteria import Criterion, ScoringContext
from .errors import InvalidPruningTargetError
from .groups import ArchitectureAdapter, GroupKind
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

    def kinds(self) -> set[GroupKind]:
        """The group kinds that need a criterion."""
        kinds = {kind for kind in ("layers", "attention_branches", "mlp_branches") if getattr(self, kind)}
        for kind, counts in (
            ("kv_groups", self.kv_groups),
            ("heads", self.heads_per_group),
            ("heads", self.mha_heads),
            ("neurons", self.neurons),
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


def _neuron_count(config: PruningConfig, layer: int, total: int) -> int:
    count = count_of(config.mlp_neurons, total)
    if config.mlp_neurons and count >= total:
        raise InvalidPruningTargetError(
            f"mlp_neurons={config.mlp_neurons!r} removes all {total} neurons of layer {layer}; "
            f"remove at most {total - 1}, or use mlp_branches to drop whole MLPs."
        )
    if config.mlp_neurons and count == 0:
        raise InvalidPruningTargetError(
            f"mlp_neurons={config.mlp_neurons!r} rounds to 0 of {total} neurons; the smallest valid fraction is {0.5 / total:.3g}."
        )
    return count


def resolve_targets(plan: PruningPlan, config: PruningConfig) -> Targets:
    """Counts for every kind, validated on every layer's shape; raises before any work is done."""
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
        if size and config.mlp_neurons:
            neurons[layer_plan.layer] = _neuron_count(config, layer_plan.layer, size)
    return Targets(
        layers,
        _block_count("attention_branches", config.attention_branches, max(with_attention, 0)),
        _block_count("mlp_branches", config.mlp_branches, max(with_mlp, 0)),
        kv_groups,
        heads,
        mha_heads,
        neurons,
    )


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Positions of the `count` lowest scores (ties broken by position)."""
    return set(torch.argsort(scores, stable=True)[:count].tolist())


def group_scores(context: ScoringContext, criterion: Criterion, index: int, kind: GroupKind) -> torch.Tensor:
    groups = context.adapter.groups(context.layer(index), index, kind)
    return criterion.score(context, groups) if groups else torch.empty(0, dtype=torch.float64)


#: scores of one kind's groups in one (original) layer: `score(layer, kind) -> tensor`.
BlockScores = Callable[[int, GroupKind], torch.Tensor]


def remove_blocks(plan: PruningPlan, targets: Targets, score: BlockScores) -> None:
    """Drop the lowest-scored layers model-wide, then branches among the remaining layers.

    Scores come through `score`, so the low-memory mode can rank from a first pass over the layers.
    """
    if targets.layers:
        scores = torch.cat([score(p.layer, "layers") for p in plan.layers])
        for position in _lowest(scores, targets.layers):
            plan.layers[position].keep_layer = False
    for kind, flag in (("attention_branches", "keep_attention"), ("mlp_branches", "keep_mlp")):
        count = getattr(targets, kind)
        if not count:
            continue
        candidates = [p for p in plan.layers if p.keep_layer and getattr(p, flag)]
        scores = torch.cat([score(p.layer, kind) for p in candidates])
        for position in _lowest(scores, count):
            setattr(candidates[position], flag, False)


def _select_heads(context: ScoringContext, criteria: Mapping[str, Criterion], plan: LayerPlan, targets: Targets) -> None:
    attention = plan.geometry.attention
    heads = targets.heads_per_group.get(plan.layer, 0)
    groups, kind = targets.kv_groups.get(plan.layer, 0), "kv_groups"
    if plan.layer in targets.mha_heads:
        groups, kind = targets.mha_heads[plan.layer], "heads"
    if groups:
        removed = _lowest(group_scores(context, criteria[kind], plan.layer, "kv_groups"), groups)
        plan.kv_heads = tuple(j for j in plan.kv_heads if j not in removed)
        plan.query_heads = tuple(h for j in plan.kv_heads for h in attention.heads_of_group(j))
    if heads:
        scores = group_scores(context, criteria["heads"], plan.layer, "heads")
        kept = []
        for j in plan.kv_heads:
            members = list(attention.heads_of_group(j))
            removed = _lowest(scores[members], heads)
            kept += [h for position, h in enumerate(members) if position not in removed]
        plan.query_heads = tuple(kept)


def plan_layer(context: ScoringContext, criteria: Mapping[str, Criterion], layer_plan: LayerPlan, targets: Targets) -> None:
    """Choose the heads, KV groups and neurons one kept layer keeps; reads only that layer."""
    if not layer_plan.keep_layer:
        return
    if layer_plan.keep_attention and layer_plan.geometry.attention:
        _select_heads(context, criteria, layer_plan, targets)
    count = targets.neurons.get(layer_plan.layer, 0)
    if layer_plan.keep_mlp and count:
        removed = _lowest(group_scores(context, criteria["neurons"], layer_plan.layer, "neurons"), count)
        layer_plan.neurons = tuple(n for n in layer_plan.neurons if n not in removed)


def build_plan(context: ScoringContext, criteria: Mapping[str, Criterion], targets: Targets) -> PruningPlan:
    """Keep the best-scored groups, the same count per layer (`criteria` maps kind → criterion)."""
    plan = PruningPlan.keep_all(context.model, context.adapter)
    remove_blocks(plan, targets, lambda index, kind: group_scores(context, criteria[kind], index, kind))
    for layer_plan in plan.layers:
        plan_layer(context, criteria, layer_plan, targets)
    return plan


def plan_for(model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig, criterion: Criterion) -> PruningPlan:
    """A uniform plan for `config`'s amounts with one data-free criterion for every kind
    (dry runs, inspection, gradual steps)."""
    targets = resolve_targets(PruningPlan.keep_all(model, adapter), config)
    return build_plan(ScoringContext(model, adapter), dict.fromkeys(GROUP_KINDS, criterion), targets)
