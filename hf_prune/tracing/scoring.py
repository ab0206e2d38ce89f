"""Scores for traced groups: the registry's criteria where they apply as they are, and the
activation criterion (structured Wanda) from input norms gathered by hooks on the consumers.

`magnitude` and `random` read only the group's own tensors, so the registry classes score traced
groups directly. `activation` needs `‖X_j‖₂` of every consumer input column j, which the engine's
calibration pass collects per transformer layer; here forward pre-hooks on the consuming linear and
convolution modules collect it for any graph, and the score is the registry criterion's formula,
`Σ_{j∈g} ‖X_j‖₂ · Σ_i |W_ij|` over the group's consumer columns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..criteria import ScoringContext, get_criterion
from ..errors import InvalidPruningTargetError
from ..groups import Group
from .graph import split_inputs

#: criteria that score traced groups, and whether they need calibration inputs
TRACED_CRITERIA = {"magnitude": False, "random": False, "activation": True}


class _WholeModel:
    """The adapter view the registry criteria expect, with the whole model as the only 'layer'."""

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return [model]


def _parameter_slices(group: Group, buffers: set[str]) -> Group:
    """The group as the criteria see it: parameters only (BatchNorm statistics are not weights)."""
    return Group(
        group.kind,
        0,
        group.index,
        tuple(p for p in group.slices if p.parameter not in buffers),
    )


@torch.no_grad()
def input_norms(model: nn.Module, consumers: set[str], calibration: Iterable) -> dict[str, torch.Tensor]:
    """`‖X_j‖₂` of every input channel (last axis of a linear, axis 1 of a convolution) of the named
    modules, over all calibration inputs."""
    squares: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))

    def hook(name: str, convolution: bool):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().double()
            x = x.movedim(1, -1) if convolution else x
            squares[name] = squares[name] + x.pow(2).reshape(-1, x.shape[-1]).sum(0)

        return record

    handles = [
        module.register_forward_pre_hook(hook(name, isinstance(module, nn.modules.conv._ConvNd)))
        for name, module in model.named_modules()
        if name in consumers
    ]
    try:
        for inputs in calibration:
            args, kwargs = split_inputs(inputs)
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.sqrt() for name, value in squares.items()}


def score_groups(
    name: str,
    model: nn.Module,
    groups: Sequence[Group],
    seed: int,
    norms: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """One score per group (lower goes first)."""
    if name not in TRACED_CRITERIA:
        raise InvalidPruningTargetError(
            f"criterion={name!r} cannot rank traced channel groups; use one of {', '.join(TRACED_CRITERIA)}."
        )
    if name == "activation":
        return torch.stack([_activation(model, group, norms) for group in groups])
    buffers = {n for n, _ in model.named_buffers()}
    context = ScoringContext(model, _WholeModel())
    return get_criterion(name, seed=seed).score(context, [_parameter_slices(g, buffers) for g in groups])


def _activation(model: nn.Module, group: Group, norms: dict[str, torch.Tensor]) -> torch.Tensor:
    score = torch.zeros((), dtype=torch.float64)
    for piece in group.slices:
        if not piece.consumer:
            continue
        weight = model.get_parameter(piece.parameter).detach().double()
        columns = weight.narrow(piece.dim, piece.start, piece.stop - piece.start).movedim(piece.dim, 0)
        reads = columns.abs().reshape(columns.shape[0], -1).sum(1)
        module = piece.parameter.rpartition(".")[0]
        score = score + (norms[module][piece.start : piece.stop] * reads).sum()
    return score
