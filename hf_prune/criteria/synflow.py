"""SynFlow (Tanaka et al. 2020, "Pruning neural networks without any data by iteratively
conserving synaptic flow"): `S_θ = |θ ⊙ ∂R/∂θ|` with `R = 1ᵀ f_|θ|(1)`, summed over a group's
parameter slices (data-free).

`f_|θ|` is the network with every parameter replaced by its absolute value, run on an all-ones
input (here `inputs_embeds` of ones, one token, or an all-ones image): every path from input to
output then contributes the product of its absolute weights, and a parameter's score is the flow
through all paths that cross it. Norm layers keep the flow bounded where the paper's convnets
needed float64. A group that writes nothing into the residual stream has no path and scores 0.
With identical input tokens every attention pattern is uniform, so query and key weights carry
no flow: heads are ranked by their value and output weights.

Iterative, as the paper prescribes to avoid layer collapse: `ROUNDS` times, the remaining groups
of each layer (layers and branches: of the model) are scored, the lowest `1/ROUNDS` of the
original count are masked, and the flow is recomputed. A group's score is the round it was
removed in plus its normalised score in that round, so the order is budget-free and
lower still means removed first.

Method notes and sources: docs/methods.md §3.11.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch.func import functional_call

from ..groups import Group, GroupKind
from ..kinds import BLOCK_KINDS
from .base import Criterion, ScoringContext
from .registry import register_criterion

ROUNDS = 10
#: Input size for configs that name none (ResNet, ConvNeXt): 64 pixels leaves every stage of their
#: stride-32 stacks a feature map of at least 2 × 2.
CONVOLUTIONAL_IMAGE_SIZE = 64


def _ones_input(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An all-ones input of one token (text) or one image (vision), in the model's dtype."""
    parameter = next(model.parameters())
    if "inputs_embeds" in inspect.signature(model.forward).parameters:
        shape = (1, 1, model.get_input_embeddings().embedding_dim)
        return {"inputs_embeds": torch.ones(shape, dtype=parameter.dtype)}
    size = getattr(model.config, "image_size", CONVOLUTIONAL_IMAGE_SIZE)
    return {"pixel_values": torch.ones(1, model.config.num_channels, size, size, dtype=parameter.dtype)}


def _layer_names(model: torch.nn.Module, layers: torch.nn.Module) -> list[str]:
    """Each layer's qualified name in `model` (ResNet's blocks live in several stages' lists)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def _flow(model: torch.nn.Module, removed: list[Group], layer_names: list[str]) -> dict[str, torch.Tensor]:
    """`|θ ⊙ ∂R/∂θ|` for every parameter of the layers, with the `removed` groups' slices zeroed."""
    absolute = {name: p.detach().abs() for name, p in model.named_parameters()}
    for group in removed:
        for piece in group.slices:
            absolute[f"{layer_names[group.layer]}.{piece.parameter}"].narrow(
                piece.dim, piece.start, piece.stop - piece.start
            ).zero_()
    for tensor in absolute.values():
        tensor.requires_grad_(True)
    output = functional_call(model, absolute, kwargs=_ones_input(model))
    flow = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).sum()
    gradients = torch.autograd.grad(flow, list(absolute.values()), allow_unused=True)
    return {
        name: (tensor.detach() * gradient).abs()
        for (name, tensor), gradient in zip(absolute.items(), gradients)
        if gradient is not None and name.startswith(tuple(f"{layer}." for layer in layer_names))
    }


class _SliceSums:
    """Sums of a score tensor over any index range along one dimension, from cumulative sums
    (one reduction per parameter and dimension instead of one per group slice)."""

    def __init__(self, scores: dict[str, torch.Tensor]):
        self.scores = scores
        self.cumulative: dict[tuple[str, int], list[float]] = {}

    def __call__(self, name: str, dim: int, start: int, stop: int) -> float:
        if (name, dim) not in self.cumulative:
            tensor = self.scores[name]
            others = [d for d in range(tensor.dim()) if d != dim]
            per_index = tensor.sum(dim=others, dtype=torch.float64) if others else tensor.double()
            self.cumulative[(name, dim)] = [0.0, *torch.cumsum(per_index, 0).tolist()]
        cumulative = self.cumulative[(name, dim)]
        return cumulative[stop] - cumulative[start]


def _group_score(sums: _SliceSums, group: Group, layer_names: list[str]) -> float:
    prefix = layer_names[group.layer]
    return sum(
        sums(f"{prefix}.{piece.parameter}", piece.dim, piece.start, piece.stop)
        for piece in group.slices
        if f"{prefix}.{piece.parameter}" in sums.scores
    )


@register_criterion
class SynFlowCriterion(Criterion):
    name = "synflow"

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self._ranks: dict[tuple[GroupKind, int, int], float] = {}

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        if (groups[0].kind, groups[0].layer, groups[0].index) not in self._ranks:
            self._rank_every_group(context, groups[0].kind)
        return torch.tensor([self._ranks[(g.kind, g.layer, g.index)] for g in groups], dtype=torch.float64)

    @torch.no_grad()
    def _rank_every_group(self, context: ScoringContext, kind: GroupKind) -> None:
        """Iterative SynFlow over all groups of `kind` in the model; fills `self._ranks`."""
        base = getattr(context.model, getattr(context.model, "base_model_prefix", ""), context.model)
        layers = context.adapter.layers(base)
        layer_names = _layer_names(base, layers)
        pools = [context.adapter.groups(layer, index, kind) for index, layer in enumerate(layers)]
        if kind in BLOCK_KINDS:  # one pool: blocks compete across the model
            pools = [[group for pool in pools for group in pool]]
        removed: list[Group] = []
        alive = [list(pool) for pool in pools]
        steps = [max(1, math.ceil(len(pool) / ROUNDS)) for pool in pools]
        for round_index in range(ROUNDS):
            if not any(alive):
                break
            with torch.enable_grad():
                sums = _SliceSums(_flow(base, removed, layer_names))
            for pool, step in zip(alive, steps):
                if not pool:
                    continue
                values = torch.tensor([_group_score(sums, group, layer_names) for group in pool], dtype=torch.float64)
                normalised = values / (values.max() + torch.finfo(torch.float64).tiny)
                order = torch.argsort(values, stable=True)
                last = round_index == ROUNDS - 1
                chosen = order if last else order[:step]
                for position in chosen.tolist():
                    group = pool[position]
                    self._ranks[(group.kind, group.layer, group.index)] = (
                        round_index + normalised[position].item() * 0.999
                    )
                    removed.append(group)
                gone = set(chosen.tolist())
                pool[:] = [group for position, group in enumerate(pool) if position not in gone]
