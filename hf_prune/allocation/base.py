"""The allocation contract: how many heads and neurons every layer gives up."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..criteria import Criterion, ScoringContext
from ..groups import GroupKind
from ..plan import PruningPlan

if TYPE_CHECKING:
    from ..config import PruningConfig
    from .counts import RemovalCounts


@dataclass
class Counts:
    """Per-layer removal counts (original layer index → count). On GQA layers `kv_groups` are
    whole groups and `heads_per_group` query heads inside every kept group; on MHA layers every
    head is its own group and goes through `mha_heads`."""

    kv_groups: dict[int, int] = field(default_factory=dict)
    heads_per_group: dict[int, int] = field(default_factory=dict)
    mha_heads: dict[int, int] = field(default_factory=dict)
    neurons: dict[int, int] = field(default_factory=dict)
    #: routed experts removed per mixture-of-experts layer (uniform under every allocation)
    experts: dict[int, int] = field(default_factory=dict)

    def kinds(self, neuron_kind: GroupKind = "neurons") -> set[GroupKind]:
        """The group kinds that need a criterion (`neurons` counts units of `neuron_kind`)."""
        kinds: set[GroupKind] = set()
        for kind, counts in (
            ("kv_groups", self.kv_groups),
            ("heads", self.heads_per_group),
            ("heads", self.mha_heads),
            (neuron_kind, self.neurons),
            ("experts", self.experts),
        ):
            if any(counts.values()):
                kinds.add(kind)
        return kinds


def group_scores(context: ScoringContext, criterion: Criterion, index: int, kind: GroupKind) -> torch.Tensor:
    """`criterion`'s scores of layer `index`'s groups of `kind` (empty when it has none)."""
    groups = context.adapter.groups(context.layer(index), index, kind)
    return criterion.score(context, groups).double() if groups else torch.empty(0, dtype=torch.float64)


class LayerScores:
    """Scores of one layer's groups of one kind, computed once per build (some criteria, such as
    `obs`, are expensive and both the allocation and the selection read them)."""

    def __init__(self, context: ScoringContext, criteria: Mapping[str, Criterion]):
        self.context = context
        self.criteria = criteria
        self._cache: dict[tuple[int, str, str], torch.Tensor] = {}

    def __call__(self, index: int, kind: GroupKind, criterion_kind: str | None = None) -> torch.Tensor:
        """Scores of layer `index`'s `kind` groups by the criterion configured for `criterion_kind`
        (default: `kind`; MHA heads are `kv_groups` groups ranked by the `heads` criterion)."""
        criterion_kind = criterion_kind or kind
        key = (index, kind, criterion_kind)
        if key not in self._cache:
            self._cache[key] = group_scores(self.context, self.criteria[criterion_kind], index, kind)
        return self._cache[key]


def lowest(scores: torch.Tensor, count: int) -> set[int]:
    """Positions of the `count` lowest scores (ties broken by position)."""
    return set(torch.argsort(scores, stable=True)[:count].tolist())


class Allocation(ABC):
    """Decides per-layer counts once blocks (layers, branches) are gone; the planner then removes
    the lowest-scored groups of each layer."""

    name: ClassVar[str]

    def validate(self, config: PruningConfig) -> None:  # noqa: B027 (optional hook: most allocations take any config)
        """Refuse, before any calibration, a config this allocation cannot honour."""

    @abstractmethod
    def counts(self, scores: LayerScores, plan: PruningPlan, removal: RemovalCounts) -> Counts:
        """Removal counts for the layers of `plan` that keep their attention / MLP."""
