"""Least-squares repair of the modules that read a convolutional stage's stream (`stage_channels`).

A removed stream channel is read by many consumers: every block's first convolution (ResNet) or
`pwconv1` (ConvNeXt), the next stage's shortcut and first convolution or downsampling convolution,
and the classifier. Each one is refitted on its own input, as `lstsq` refits a layer's consumer
(docs/methods.md §4.1, §4.5): `W'_S = W G[:, S] (G[S, S] + λI)⁻¹`, `G` the Gram matrix of the stream channels at
that consumer's input over the calibration images (`CalibrationStatistics.stream_consumers`). A
convolution is refitted per kernel tap from the channel Gram at one pixel, as inner channels are.

What this does not model: the kept channels themselves drift once earlier blocks lost channels,
and ConvNeXt's LayerNorms renormalise over fewer channels; the refit uses the dense statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration.statistics import CalibrationStatistics
from ..groups import ArchitectureAdapter
from ..groups.base import matrix_view
from ..kinds import DAMPING
from ..plan import PruningPlan
from .ispasp import least_squares_columns


@torch.no_grad()
def refit_stream_consumers(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    statistics: CalibrationStatistics,
    damping: float = DAMPING,
) -> None:
    """Refit, in place, the kept input columns of every consumer of every stage that loses stream channels."""
    for stage, removed in plan.removed_stream_channels(model, adapter).items():
        width = adapter.stream_width(model, stage)
        gone = set(removed)
        for name in adapter.stream_members(model, stage).consumers:
            module = model.get_submodule(name)
            parameter = module.weight
            weight = matrix_view(parameter)
            kept = torch.tensor([c for c in range(width) if c not in gone], device=parameter.device)
            stats = statistics.stream_consumers[name]
            new = least_squares_columns(weight, stats.gram, kept, damping=damping, count=stats.count)
            new = new.to(parameter.dtype)
            if parameter.dim() == 4:
                out_channels, _, height, kernel_width = parameter.shape
                parameter[:, kept] = new.reshape(out_channels, height, kernel_width, len(kept)).movedim(-1, 1)
            else:
                parameter[:, kept] = new
