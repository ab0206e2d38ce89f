"""The criterion contract: score dependency groups, lower means less important."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..calibration.statistics import CalibrationStatistics, Requirement
from ..errors import InvalidPruningTargetError
from ..groups import ArchitectureAdapter, Branch, Group, GroupKind
from ..groups.base import input_slices, matrix_view
from ..kinds import BLOCK_KINDS, DAMPING, EXPERT_KINDS, GROUP_KINDS, STAGE_KINDS

#: The kinds every criterion ranks unless it names fewer. Stage kinds cross layers and experts are whole
#: routed sub-networks: only criteria that name them rank them, the others are refused with a typed error.
ALL_KINDS: frozenset[GroupKind] = frozenset(GROUP_KINDS) - STAGE_KINDS - EXPERT_KINDS


@dataclass
class ScoringContext:
    """What a criterion may read: the dense model, its adapter, the calibration statistics and
    windows (for criteria that run the model themselves)."""

    model: nn.Module
    adapter: ArchitectureAdapter
    statistics: CalibrationStatistics | None = None
    windows: torch.Tensor | None = None
    batch_size: int = 8
    #: ridge of least-squares solves (`PruningConfig.damping`).
    damping: float = DAMPING

    def layer(self, index: int) -> nn.Module:
        return self.adapter.layers(self.model)[index]


class Criterion(ABC):
    """Scores groups of one kind; the planner removes the lowest scores."""

    name: ClassVar[str]
    #: statistics the calibration pass must collect for this criterion.
    requires: ClassVar[frozenset[Requirement]] = frozenset()
    #: group kinds this criterion can rank.
    kinds: ClassVar[frozenset[GroupKind]] = ALL_KINDS
    #: whether the criterion runs the calibration windows itself (beyond the statistics pass).
    needs_windows: ClassVar[bool] = False

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        """One float per group, in the order given (all groups belong to one layer and kind)."""


def group_tensors(context: ScoringContext, group: Group, producers_only: bool = False) -> list[torch.Tensor]:
    """The parameter slices a group owns, as views (without its consumers' columns if `producers_only`)."""
    root = context.model if group.kind in STAGE_KINDS else context.layer(group.layer)
    return [
        root.get_parameter(piece.parameter).detach().narrow(piece.dim, piece.start, piece.stop - piece.start)
        for piece in group.slices
        if not (producers_only and piece.consumer)
    ]


def routing_of(context: ScoringContext, groups: Sequence[Group], reads: str = "selected"):
    """The routing statistics of the layer the expert groups belong to (`calibration.statistics.RoutingStatistics`),
    whose field `reads` the criterion needs."""
    index = groups[0].layer
    if context.statistics is None or index not in context.statistics.routing:
        raise InvalidPruningTargetError(
            f"layer {index}'s routing was not measured: expert criteria read the calibration pass's `routing` "
            "statistics; run them through HFPruner.prune (or collect_statistics with 'routing')."
        )
    routing = context.statistics.routing[index]
    if getattr(routing, reads) is None:
        raise InvalidPruningTargetError(
            f"layer {index}'s experts are a per-expert module list, whose block applies the gate weights itself: "
            f"the routing's {reads!r} was not measured; rank experts with criterion={{'experts': 'frequency'}} "
            "(or 'magnitude', 'random')."
        )
    return routing


def branch_of(kind: GroupKind) -> Branch:
    return "mlp" if kind in ("neurons", "channels", "mlp_branches") else "attention"


def consumer_weight(context: ScoringContext, index: int, branch: Branch) -> torch.Tensor:
    """The consuming projection's weight as (outputs × input channels), whatever its storage
    (a convolution's kernel taps count as outputs, see `matrix_view`)."""
    layer = context.layer(index)
    name = context.adapter.o_proj if branch == "attention" else context.adapter.down_proj
    piece = input_slices(layer, name, 0, 1)[0]
    weight = layer.get_parameter(piece.parameter).detach()
    return weight.T if piece.dim == 0 else matrix_view(weight)


def sum_over_groups(per_channel: torch.Tensor, groups: Sequence[Group]) -> torch.Tensor:
    """Σ of a per-input-channel score over each group's consumer channels."""
    return torch.stack(
        [
            sum(per_channel[piece.start : piece.stop].sum() for piece in group.slices if piece.consumer)
            for group in groups
        ]
    )


def channel_score(context: ScoringContext, groups: Sequence[Group], per_channel) -> torch.Tensor:
    """Score one layer's groups from a per-channel score `per_channel(weight, statistics) -> (C,)`,
    where `weight` is the consumer's (outputs × channels) weight in float64.

    Heads, KV groups and neurons sum their own channels; a branch sums all its channels; a layer
    sums its two branches.
    """
    kind, index = groups[0].kind, groups[0].layer
    branches: tuple[Branch, ...] = ("attention", "mlp") if kind == "layers" else (branch_of(kind),)
    vectors = [
        per_channel(consumer_weight(context, index, branch).double(), context.statistics.consumers[(index, branch)])
        for branch in branches
        if (index, branch) in context.statistics.consumers
    ]
    if kind in BLOCK_KINDS:
        return torch.stack([sum(v.sum() for v in vectors) for _ in groups]).double()
    return sum_over_groups(vectors[0], groups)
