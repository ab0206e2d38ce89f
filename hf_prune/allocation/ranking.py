"""Model-wide ranking for the non-uniform allocations: candidate units per layer, normalised
scores, and a budget spent on the lowest-ranked units first.

A unit is one KV group (one head on MHA layers), one query-head slot (the k-th weakest head of
every kept group of a GQA layer, so each group keeps the same count), or one neuron. Within a
layer the units go weakest first, so only the per-layer counts leave this module; the planner
then removes the lowest-scored groups of each layer exactly as it does for `uniform`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..plan import LayerPlan, PruningPlan
from .base import Counts, LayerScores
from .counts import RemovalCounts, rounded_neurons

Normalise = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Candidates:
    """One layer's removable units of one kind: raw scores (weakest first), cost of one, most removable."""

    scores: torch.Tensor
    cost: float
    limit: int


def by_mean(scores: torch.Tensor) -> torch.Tensor:
    """Scores as multiples of the layer's mean magnitude (`global`)."""
    return scores / scores.abs().mean().clamp_min(torch.finfo(scores.dtype).tiny)


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """Z-scores within the layer (`adaptive`, as FLAP standardises each layer and module)."""
    spread = scores.std() if scores.numel() > 1 else scores.new_tensor(0.0)
    return (scores - scores.mean()) / (spread if spread > 0 else 1.0)


def _open_layers(plan: PruningPlan, removal: RemovalCounts, flag: str) -> list[LayerPlan]:
    return [p for p in plan.layers if p.layer not in removal.protected and p.keep_layer and getattr(p, flag)]


def attention_candidates(scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> dict[int, Candidates]:
    """KV groups of GQA layers, heads of MHA layers."""
    candidates = {}
    for p in _open_layers(plan, removal, "keep_attention"):
        if p.geometry.attention is None:
            continue
        mha = p.geometry.attention.heads_per_group == 1
        ranked = scores(p.layer, "kv_groups", "heads" if mha else "kv_groups").sort().values
        candidates[p.layer] = Candidates(ranked, removal.budget.costs[p.layer].kv_group, len(ranked) - 1)
    return candidates


def head_slot_candidates(
    scores: LayerScores, plan: PruningPlan, removal: RemovalCounts, kv_counts: Counts
) -> dict[int, Candidates]:
    """Query-head slots of GQA layers, given the KV groups `kv_counts` removes."""
    from .planning import kept_groups  # planning imports the allocations

    candidates = {}
    for p in _open_layers(plan, removal, "keep_attention"):
        attention = p.geometry.attention
        if attention is None or attention.heads_per_group == 1:
            continue
        kept = kept_groups(scores, p, kv_counts)
        ranked = scores(p.layer, "heads")
        per_group = torch.stack([ranked[list(attention.heads_of_group(j))].sort().values for j in kept])
        slots = per_group.sum(0)[:-1]  # every group keeps at least one head
        candidates[p.layer] = Candidates(slots, removal.budget.costs[p.layer].head * len(kept), len(slots))
    return candidates


def neuron_candidates(scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> dict[int, Candidates]:
    candidates = {}
    for p in _open_layers(plan, removal, "keep_mlp"):
        if not p.geometry.intermediate_size:
            continue
        ranked = scores(p.layer, removal.neuron_kind).sort().values
        limit = len(ranked) - max(1, removal.round_to)
        candidates[p.layer] = Candidates(ranked, removal.budget.costs[p.layer].neuron, max(limit, 0))
    return candidates


def uniform_cost(candidates: dict[int, Candidates], counts: dict[int, int]) -> float:
    """What the uniform counts remove from these candidate layers."""
    return sum(counts.get(layer, 0) * c.cost for layer, c in candidates.items())


def spend(pools: dict[str, dict[int, Candidates]], budget: float, normalise: Normalise) -> dict[str, dict[int, int]]:
    """Per kind and layer, how many units go when the budget is spent on the lowest normalised
    scores of all pools together. A unit that would overshoot the budget by more than half its
    cost is skipped (a cheaper one may still fit), so the spend lands within half a unit."""
    units = []
    for kind, layers in pools.items():
        for layer, candidates in layers.items():
            for value in normalise(candidates.scores).tolist():
                units.append((value, kind, layer, candidates.cost, candidates.limit))
    units.sort(key=lambda unit: unit[0])  # stable: ties keep layer order
    taken: dict[str, dict[int, int]] = {kind: defaultdict(int) for kind in pools}
    spent = 0.0
    for _, kind, layer, cost, limit in units:
        if spent >= budget:
            break
        if taken[kind][layer] >= limit or spent + cost / 2 > budget:
            continue
        taken[kind][layer] += 1
        spent += cost
    return {kind: dict(layers) for kind, layers in taken.items()}


def attention_counts(plan: PruningPlan, removed: dict[int, int]) -> Counts:
    """`removed` attention units as counts: heads on MHA layers, KV groups on GQA layers."""
    counts = Counts()
    for p in plan.layers:
        if p.layer in removed and p.geometry.attention is not None:
            into = counts.mha_heads if p.geometry.attention.heads_per_group == 1 else counts.kv_groups
            into[p.layer] = removed[p.layer]
    return counts


def rounded(plan: PruningPlan, neurons: dict[int, int], round_to: int) -> dict[int, int]:
    widths = {p.layer: p.geometry.intermediate_size or 0 for p in plan.layers}
    return {layer: rounded_neurons(count, widths[layer], round_to) for layer, count in neurons.items()}
