"""Plans that grow toward a `PruningConfig`'s targets: part of every amount now, all of it at the end.

Each step's plan comes from `build_plan` itself (so every amount rule, GQA included, stays in
one place) with integer counts `round(fraction × final count)` per kind, and with a criterion
that scores every group the previous plan removed `−inf`: the removed set only grows (once
masked, always masked), and at fraction 1 the config's own amounts apply, so the targets are
met exactly.

Method notes and sources: docs/methods.md §6.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from torch import nn

from ..allocation import plan_for
from ..config import PruningConfig
from ..criteria import Criterion, ScoringContext
from ..criteria.random import RandomCriterion
from ..errors import InvalidPruningTargetError
from ..groups import ArchitectureAdapter, Group
from ..kinds import ATTENTION_KINDS
from ..plan import LayerPlan, PruningPlan

#: (model, adapter, groups of one kind in one layer) → one score per group, lower = less important.
ScoreFunction = Callable[[nn.Module, ArchitectureAdapter, Sequence[Group]], torch.Tensor]


def is_removed(plan: PruningPlan, group: Group) -> bool:
    """Whether `plan` already removes (masks) `group`."""
    layer: LayerPlan = plan.layers[group.layer]
    if not layer.keep_layer:
        return True
    if group.kind == "layers":
        return False
    if group.kind in ATTENTION_KINDS:
        if not layer.keep_attention:
            return True
        if group.kind == "heads":
            return group.index not in layer.query_heads
        return group.kind == "kv_groups" and group.index not in layer.kv_heads
    if not layer.keep_mlp:
        return True
    if group.kind == "experts":
        return group.index not in layer.experts
    return group.kind == "neurons" and group.index not in layer.neurons


class _KeepRemoved(Criterion):
    """Scores from `score`, but `−inf` for every group `previous` removed, so they are chosen first."""

    name = "keep_removed"

    def __init__(self, score: ScoreFunction, previous: PruningPlan):
        super().__init__()
        self._score = score
        self._previous = previous

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        scores = self._score(context.model, context.adapter, groups).to(torch.float64).clone()
        for position, group in enumerate(groups):
            if is_removed(self._previous, group):
                scores[position] = float("-inf")
        return scores


def final_counts(plan: PruningPlan) -> dict[str, int]:
    """Per-kind counts a (uniform) final plan removes, in `PruningConfig` amount names (`experts` on
    mixture-of-experts models only)."""
    kept = [layer for layer in plan.layers if layer.keep_layer]
    counts = {
        "layers": len(plan.layers) - len(kept),
        "attention_branches": sum(1 for p in kept if p.geometry.attention is not None and not p.keep_attention),
        "mlp_branches": sum(1 for p in kept if p.geometry.intermediate_size is not None and not p.keep_mlp),
        "kv_groups": 0,
        "attention_heads": 0,
        "mlp_neurons": 0,
    }
    with_attention = [p for p in kept if p.keep_attention and p.geometry.attention is not None]
    if with_attention:
        layer, attention = with_attention[0], with_attention[0].geometry.attention
        if attention.heads_per_group == 1:  # MHA: heads are removed as their own KV groups
            counts["attention_heads"] = attention.num_heads - len(layer.query_heads)
        else:
            counts["kv_groups"] = attention.num_kv_heads - len(layer.kv_heads)
            counts["attention_heads"] = attention.heads_per_group - len(layer.query_heads) // len(layer.kv_heads)
    with_mlp = [p for p in kept if p.keep_mlp and p.geometry.intermediate_size is not None]
    if with_mlp:
        counts["mlp_neurons"] = with_mlp[0].geometry.intermediate_size - len(with_mlp[0].neurons)
    with_experts = [p for p in with_mlp if p.geometry.experts]
    if with_experts:  # mixture-of-experts models only
        counts["experts"] = with_experts[0].geometry.experts - len(with_experts[0].experts)
    return counts


class GradualPlanner:
    """Builds the plan for any fraction of a config's targets, a superset of the previous plan."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, config: PruningConfig):
        geometries = {adapter.geometry(layer) for layer in adapter.layers(model)}
        if len(geometries) > 1:
            raise InvalidPruningTargetError(
                "gradual pruning needs every layer to have the same shape (uniform allocation), but this model's "
                "layers differ; prune it in one shot with HFPruner.prune instead."
            )
        self.config = config
        # Validates every amount against the model (the same errors as HFPruner.prune) and fixes
        # the per-kind counts; the criterion does not matter for counts.
        self.counts = final_counts(plan_for(model, adapter, config, RandomCriterion()))

    def config_at(self, fraction: float) -> PruningConfig:
        """The config removing `round(fraction × final count)` of every kind; the config itself at 1."""
        if fraction >= 1:
            return self.config
        scaled = {kind: int(fraction * count + 0.5) for kind, count in self.counts.items()}
        return replace(self.config, sparsity=0.0, target_params=0, target_flops=0, **scaled)

    def plan_at(
        self,
        model: nn.Module,
        adapter: ArchitectureAdapter,
        fraction: float,
        score: ScoreFunction,
        previous: PruningPlan,
    ) -> PruningPlan:
        return plan_for(model, adapter, self.config_at(fraction), _KeepRemoved(score, previous))
