"""Scores → what to keep. `uniform`: the same count in every layer, so a standard config fits.

Order: whole layers first, then branches among the remaining layers, then KV groups, query
heads inside the kept groups, and MLP neurons inside the branches that remain.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PruningConfig, count_of
from .criteria import Criterion
from .errors import InvalidPruningTargetError
from .groups import ArchitectureAdapter, GroupKind
from .plan import LayerPlan, PruningPlan


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Positions of the `count` lowest scores (ties broken by position)."""
    return set(torch.argsort(scores, stable=True)[:count].tolist())


def _scores(model: nn.Module, adapter: ArchitectureAdapter, criterion: Criterion, index: int, kind: GroupKind):
    groups = adapter.groups(adapter.layers(model)[index], index, kind)
    return criterion.score(model, adapter, groups) if groups else torch.empty(0)


def _remove_blocks(
    model: nn.Module, adapter: ArchitectureAdapter, criterion: Criterion, plan: PruningPlan, config: PruningConfig
) -> None:
    """Whole layers, then attention and MLP branches, chosen across the model by score."""
    total = len(plan.layers)
    count = count_of(config.layers, total)
    if count >= total:
        raise InvalidPruningTargetError(
            f"layers={config.layers!r} removes all {total} layers; remove at most {total - 1}."
        )
    if count:
        scores = torch.cat([_scores(model, adapter, criterion, p.layer, "layers") for p in plan.layers])
        for position in _lowest(scores, count):
            plan.layers[position].keep_layer = False

    for kind, flag, amount in (
        ("attention_branches", "keep_attention", config.attention_branches),
        ("mlp_branches", "keep_mlp", config.mlp_branches),
    ):
        candidates = [p for p in plan.layers if p.keep_layer and getattr(p, flag)]
        count = count_of(amount, len(candidates))
        if count == 0:
            continue
        if count >= len(candidates):
            raise InvalidPruningTargetError(
                f"{kind}={amount!r} removes all {len(candidates)} remaining {kind.replace('_', ' ')}; "
                f"remove at most {len(candidates) - 1}."
            )
        scores = torch.cat([_scores(model, adapter, criterion, p.layer, kind) for p in candidates])
        for position in _lowest(scores, count):
            setattr(candidates[position], flag, False)


def _prune_heads(
    model: nn.Module, adapter: ArchitectureAdapter, criterion: Criterion, plan: LayerPlan, config: PruningConfig
) -> None:
    attention = plan.geometry.attention
    per_group = attention.heads_per_group
    if per_group == 1:  # MHA: a head is its own KV group, so heads are removed as KV groups
        if config.kv_groups:
            raise InvalidPruningTargetError(
                f"kv_groups={config.kv_groups!r}: layer {plan.layer} uses multi-head attention (one query head per "
                "KV head); use attention_heads to remove heads."
            )
        amount, total, name = config.attention_heads, attention.num_heads, "attention_heads"
    else:
        amount, total, name = config.kv_groups, attention.num_kv_heads, "kv_groups"
    count = count_of(amount, total)
    if count >= total and amount:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} removes all {total} {'heads' if per_group == 1 else 'KV groups'} of layer "
            f"{plan.layer}; the largest valid value is {total - 1} (or a fraction below {(total - 0.5) / total:.3g})."
        )
    if amount and count == 0:
        raise InvalidPruningTargetError(
            f"{name}={amount!r} rounds to 0 of {total} per layer; the smallest valid fraction is {0.5 / total:.3g} (1 of {total})."
        )
    if count:
        removed = _lowest(_scores(model, adapter, criterion, plan.layer, "kv_groups"), count)
        plan.kv_heads = tuple(j for j in plan.kv_heads if j not in removed)
        plan.query_heads = tuple(h for j in plan.kv_heads for h in attention.heads_of_group(j))

    if per_group == 1 or not config.attention_heads:
        return
    count = count_of(config.attention_heads, per_group)
    if count == 0:
        raise InvalidPruningTargetError(
            f"attention_heads={config.attention_heads!r} rounds to 0 of the {per_group} query heads in each KV group; "
            f"the smallest valid fraction is {0.5 / per_group:.3g} (1 head per group)."
        )
    if count >= per_group:
        raise InvalidPruningTargetError(
            f"attention_heads={config.attention_heads!r} removes all {per_group} query heads of each KV group; the "
            f"largest valid value is {per_group - 1} (or a fraction below {(per_group - 0.5) / per_group:.3g}). "
            "To remove whole groups use kv_groups."
        )
    scores = _scores(model, adapter, criterion, plan.layer, "heads")
    kept = []
    for j in plan.kv_heads:
        heads = list(attention.heads_of_group(j))
        removed = _lowest(scores[heads], count)
        kept += [h for position, h in enumerate(heads) if position not in removed]
    plan.query_heads = tuple(kept)


def _prune_neurons(
    model: nn.Module, adapter: ArchitectureAdapter, criterion: Criterion, plan: LayerPlan, config: PruningConfig
) -> None:
    total = plan.geometry.intermediate_size
    count = count_of(config.mlp_neurons, total)
    if count >= total:
        raise InvalidPruningTargetError(
            f"mlp_neurons={config.mlp_neurons!r} removes all {total} neurons of layer {plan.layer}; "
            f"remove at most {total - 1}, or use mlp_branches to drop whole MLPs."
        )
    if config.mlp_neurons and count == 0:
        raise InvalidPruningTargetError(
            f"mlp_neurons={config.mlp_neurons!r} rounds to 0 of {total} neurons; the smallest valid fraction is {0.5 / total:.3g}."
        )
    if count:
        removed = _lowest(_scores(model, adapter, criterion, plan.layer, "neurons"), count)
        plan.neurons = tuple(n for n in plan.neurons if n not in removed)


def build_plan(
    model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig, criterion: Criterion
) -> PruningPlan:
    """Score the groups `config` asks about and keep the best ones, the same count per layer."""
    plan = PruningPlan.keep_all(model, adapter)
    _remove_blocks(model, adapter, criterion, plan, config)
    for layer_plan in plan.layers:
        if not layer_plan.keep_layer:
            continue
        if layer_plan.keep_attention and layer_plan.geometry.attention and (config.kv_groups or config.attention_heads):
            _prune_heads(model, adapter, criterion, layer_plan, config)
        if layer_plan.keep_mlp and layer_plan.geometry.intermediate_size and config.mlp_neurons:
            _prune_neurons(model, adapter, criterion, layer_plan, config)
    return plan
