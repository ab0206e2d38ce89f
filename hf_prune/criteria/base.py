"""The criterion contract: score dependency groups, lower means less important."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ..groups import ArchitectureAdapter, Group


class Criterion(ABC):
    """Scores groups of one kind; the planner removes the lowest scores."""

    name: ClassVar[str]

    def __init__(self, seed: int = 0):
        self.seed = seed

    @abstractmethod
    def score(self, model: nn.Module, adapter: ArchitectureAdapter, groups: Sequence[Group]) -> torch.Tensor:
        """One float per group, in the order given."""


def group_tensors(model: nn.Module, adapter: ArchitectureAdapter, group: Group) -> list[torch.Tensor]:
    """The parameter slices a group owns, as views."""
    layer = adapter.layers(model)[group.layer]
    return [
        layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start)
        for piece in group.slices
    ]
