"""RemovalCounts + scores → a `PruningPlan`: blocks first, then the allocation's per-layer counts.

Whole layers go first, then branches among the remaining layers (both ranked model-wide, never
in `protected_layers`), then KV groups, query heads inside the kept groups, and MLP neurons
inside the branches that remain, the lowest-scored of each layer. Stream channels of convolutional
stages (`stage_channels`) go last, the lowest-scored of each stage.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..criteria import Criterion, ScoringContext
from ..groups import ArchitectureAdapter, GroupKind
from ..kinds import GROUP_KINDS
from ..plan import LayerPlan, PruningPlan
from .base import Counts, LayerScores, lowest
from .counts import RemovalCounts, resolve_counts
from .registry import get_allocation

if TYPE_CHECKING:
    from ..config import PruningConfig

#: scores of one kind's groups in one (original) layer: `score(layer, kind) -> tensor`.
BlockScores = Callable[[int, GroupKind], torch.Tensor]


def remove_blocks(plan: PruningPlan, removal: RemovalCounts, scores: BlockScores) -> None:
    """Drop the lowest-scored layers model-wide, then branches among the remaining layers. Scores
    come through `scores`, so the low-memory mode can rank from a first pass over the layers."""
    open_plans = [p for p in plan.layers if p.layer not in removal.protected]
    if removal.layers:
        removable = [p for p in open_plans if p.layer not in removal.fixed]
        ranked = torch.cat([scores(p.layer, "layers") for p in removable])
        for position in lowest(ranked, removal.layers):
            removable[position].keep_layer = False
    for kind, flag in (("attention_branches", "keep_attention"), ("mlp_branches", "keep_mlp")):
        count = getattr(removal, kind)
        if not count:
            continue
        candidates = [p for p in open_plans if p.keep_layer and getattr(p, flag)]
        ranked = torch.cat([scores(p.layer, kind) for p in candidates])
        for position in lowest(ranked, count):
            setattr(candidates[position], flag, False)


def kept_groups(scores: LayerScores, plan: LayerPlan, counts: Counts) -> tuple[int, ...]:
    """The KV groups (GQA) or heads (MHA) layer `plan` keeps under `counts`."""
    if plan.layer in counts.mha_heads:
        removed = lowest(scores(plan.layer, "kv_groups", "heads"), counts.mha_heads[plan.layer])
    elif counts.kv_groups.get(plan.layer, 0):
        removed = lowest(scores(plan.layer, "kv_groups"), counts.kv_groups[plan.layer])
    else:  # no KV group goes: nothing to score (and no kv_groups criterion may be configured)
        removed = set()
    return tuple(j for j in plan.kv_heads if j not in removed)


def _select_heads(scores: LayerScores, plan: LayerPlan, counts: Counts) -> None:
    attention = plan.geometry.attention
    if counts.kv_groups.get(plan.layer) or counts.mha_heads.get(plan.layer):
        plan.kv_heads = kept_groups(scores, plan, counts)
        plan.query_heads = tuple(h for j in plan.kv_heads for h in attention.heads_of_group(j))
    heads = counts.heads_per_group.get(plan.layer, 0)
    if heads:
        ranked = scores(plan.layer, "heads")
        kept = []
        for j in plan.kv_heads:
            members = list(attention.heads_of_group(j))
            removed = lowest(ranked[members], heads)
            kept += [h for position, h in enumerate(members) if position not in removed]
        plan.query_heads = tuple(kept)


def _select_groups(
    scores: LayerScores, layer_plan: LayerPlan, counts: Counts, neuron_kind: GroupKind, head_scores=None
) -> None:
    """The groups one kept layer keeps; heads (and KV groups) ranked by `head_scores` where given (`tie_heads`)."""
    if not layer_plan.keep_layer:
        return
    if layer_plan.keep_attention and layer_plan.geometry.attention:
        _select_heads(head_scores or scores, layer_plan, counts)
    count = counts.neurons.get(layer_plan.layer, 0)
    if layer_plan.keep_mlp and count:
        removed = lowest(scores(layer_plan.layer, neuron_kind), count)
        layer_plan.neurons = tuple(n for n in layer_plan.neurons if n not in removed)
    count = counts.experts.get(layer_plan.layer, 0)
    if layer_plan.keep_mlp and count:
        removed = lowest(scores(layer_plan.layer, "experts"), count)
        layer_plan.experts = tuple(e for e in layer_plan.experts if e not in removed)


def plan_layer(
    context: ScoringContext, criteria: Mapping[str, Criterion], layer_plan: LayerPlan, removal: RemovalCounts
) -> None:
    """Choose the heads, KV groups and neurons one kept layer keeps under the uniform counts,
    reading only that layer (the low-memory mode plans layer by layer)."""
    _select_groups(LayerScores(context, criteria), layer_plan, removal.counts, removal.neuron_kind)


def build_plan(context: ScoringContext, criteria: Mapping[str, Criterion], removal: RemovalCounts) -> PruningPlan:
    """Keep the best-scored groups (`criteria` maps kind → criterion) in the counts the
    configured allocation decides."""
    plan = PruningPlan.keep_all(context.model, context.adapter)
    scores = LayerScores(context, criteria)
    remove_blocks(plan, removal, scores)
    counts = get_allocation(removal.allocation).counts(scores, plan, removal)
    counts.experts = counts.experts or removal.counts.experts  # experts go uniformly under every allocation
    head_scores = tie_heads(scores, plan, counts) if context.adapter.tied_heads else None
    for layer_plan in plan.layers:
        _select_groups(scores, layer_plan, counts, removal.neuron_kind, head_scores)
    select_stream_channels(context, criteria, plan, removal)
    return plan


def tie_heads(scores: LayerScores, plan: PruningPlan, counts: Counts) -> Callable[..., torch.Tensor]:
    """One head set for every layer, where heads are tied across layers (`ArchitectureAdapter.tied_heads`: head `j`
    of every layer is one group). Every layer that keeps its attention removes the same number of heads (KV
    groups), the rounded mean of the allocation's counts over those layers, and ranks head `j` by
    `Σ_l s_l(j)`, the sum of its scores over those layers (a coupled group's score is the sum of its members' in
    Torch-Pruning: Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023), so that `query_heads` are
    identical in every such layer. Returns the summed scores, read in place of each layer's own."""
    tied = [p.layer for p in plan.layers if p.keep_layer and p.keep_attention and p.geometry.attention is not None]
    for table in (counts.kv_groups, counts.heads_per_group, counts.mha_heads):
        if tied and any(table.get(layer, 0) for layer in tied):
            count = round(sum(table.get(layer, 0) for layer in tied) / len(tied))
            table.update(dict.fromkeys(tied, count))

    def summed(index: int, kind: GroupKind, criterion_kind: str | None = None) -> torch.Tensor:
        return sum(scores(layer, kind, criterion_kind) for layer in tied)

    return summed


def select_stream_channels(
    context: ScoringContext, criteria: Mapping[str, Criterion], plan: PruningPlan, removal: RemovalCounts
) -> None:
    """Keep, in every stage, all but the `removal.stage_channels` lowest-scored stream channels."""
    for stage, count in removal.stage_channels.items():
        if not count:
            continue
        groups = context.adapter.stage_groups(context.model, stage)
        removed = lowest(criteria["stage_channels"].score(context, groups).double(), count)
        plan.stream_channels[stage] = tuple(g.index for position, g in enumerate(groups) if position not in removed)


def plan_for(
    model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig, criterion: Criterion
) -> PruningPlan:
    """A plan for `config` with one data-free criterion for every kind (dry runs, inspection,
    gradual steps)."""
    removal = resolve_counts(model, adapter, config)
    return build_plan(ScoringContext(model, adapter), dict.fromkeys(GROUP_KINDS, criterion), removal)
