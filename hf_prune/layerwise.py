"""Layer-by-layer pruning in memory on the activations the pruned model computes.

The one-pass prune measures every layer on the dense model's activations, so each layer is
scored and repaired as if the layers before it were intact. With `propagate="pruned"` the layers
are handled in order instead (SparseGPT's sequential calibration): layer `l` is measured on what
the already pruned and repaired layers `0..l−1` compute, then scored, planned, repaired and
masked, and its outputs become the inputs of layer `l+1`. Later layers thereby see, and their
least-squares refit absorbs, the error of the earlier ones. It costs about one more forward pass
than the one-pass prune (each layer runs once to measure, once to propagate); removing layers or
branches adds a whole-model pass that ranks them first. Only `uniform` allocation fits the
layer-at-a-time order (the others rank every layer's groups together).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import Targets, plan_layer, remove_blocks
from .allocation.base import LayerScores
from .config import PruningConfig
from .criteria import Criterion, ScoringContext
from .distributed import local_share, sum_across_processes
from .groups import ArchitectureAdapter
from .groups.base import channels_last, in_features, out_features
from .layer_inputs import LayerInputs, capture_layer_inputs, first_output
from .layer_replacement import FOLDING_REPAIRS, RemovedRun, add_stream_target, removed_runs
from .masking import masked_slices
from .plan import PruningPlan
from .reconstruction import reconstruct
from .statistics import CalibrationStatistics, collect_statistics, register_layer_hooks, sum_statistics

BLOCK_KINDS = ("layers", "attention_branches", "mlp_branches")


def _rank_blocks(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    batches: list[torch.Tensor],
    criteria: Mapping[str, Criterion],
    targets: Targets,
    config: PruningConfig,
) -> None:
    """Drop layers and branches as the one-pass prune would: from one whole-model pass."""
    kinds = [kind for kind in BLOCK_KINDS if getattr(targets, kind)]
    if not kinds:
        return
    requirements = set().union(*(criteria[kind].requires for kind in kinds))
    statistics = collect_statistics(model, adapter, batches, requirements) if requirements else None
    context = ScoringContext(model, adapter, statistics=statistics, batch_size=config.batch_size)
    scores = LayerScores(context, {kind: criteria[kind] for kind in kinds})
    remove_blocks(plan, targets, scores)


@torch.no_grad()
def _mask_layer(layer: nn.Module, adapter: ArchitectureAdapter, layer_plan) -> None:
    """Zero what the plan removes in this layer, so its outputs are the pruned layer's."""
    for piece in masked_slices(adapter, layer, layer_plan):
        layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()


@torch.no_grad()
def _stream_target(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    run: RemovedRun,
    inputs: LayerInputs,
    writer_inputs: list[torch.Tensor],
) -> torch.Tensor:
    """What the removed layers after `run.writer` add to the stream, run on the writer's (still
    dense) outputs, against the writer's `down_proj` inputs (`layer_replacement`)."""
    layers = adapter.layers(model)
    before = inputs.outputs(layers[run.writer], run.writer)
    after = list(before)
    for index in range(run.first, run.last + 1):
        after = [
            first_output(layers[index](h, *a, **k)) for h, a, k in zip(after, inputs.args[index], inputs.kwargs[index])
        ]
    down_proj = layers[run.writer].get_submodule(adapter.down_proj)
    target = torch.zeros(out_features(down_proj), in_features(down_proj), dtype=torch.float64, device=before[0].device)
    for a, b, c in zip(writer_inputs, before, after):
        add_stream_target(target, a, b, c)
    sum_across_processes([target])
    return target


def prune_layer_by_layer(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    config: PruningConfig,
    criteria: Mapping[str, Criterion],
    targets: Targets,
    windows: torch.Tensor,
) -> PruningPlan:
    """Plan, repair and mask `model` in place one layer at a time; returns the plan to cut."""
    batches = local_share(list(windows.split(config.batch_size)))
    plan = PruningPlan.keep_all(model, adapter)
    _rank_blocks(model, adapter, plan, batches, criteria, targets, config)
    requirements = set().union(*(c.requires for c in criteria.values()))
    if config.reconstruct != "none":
        requirements |= {"moments", "mlp_gram"}
    runs = {run.writer: run for run in removed_runs(model, adapter, plan)} if config.reconstruct in FOLDING_REPAIRS else {}
    device = next(model.parameters()).device
    inputs = capture_layer_inputs(model, adapter, batches, device)
    layers = adapter.layers(model)
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(len(layers)), desc="pruning layer by layer", unit="layer"):
            layer, layer_plan = layers[index], plan.layers[index]
            if not layer_plan.keep_layer:
                continue  # the pruned model skips it: its inputs go on unchanged
            statistics = CalibrationStatistics(requirements=frozenset(requirements))
            handles = register_layer_hooks(statistics, index, layer, adapter, None)
            writer_inputs: list[torch.Tensor] = []
            if index in runs:
                handles.append(
                    layer.get_submodule(adapter.down_proj).register_forward_pre_hook(
                        lambda m, args: writer_inputs.append(channels_last(m, args[0]))
                    )
                )
            try:
                inputs.run(layer, index, advance=False)
            finally:
                for handle in handles:
                    handle.remove()
            statistics.batches, statistics.tokens = len(batches), sum(b.numel() for b in batches)
            sum_statistics(statistics)
            plan_layer(ScoringContext(model, adapter, statistics=statistics, batch_size=config.batch_size), criteria, layer_plan, targets)
            stream_target = None
            if index in runs:
                stream_target = {index: _stream_target(model, adapter, runs[index], inputs, writer_inputs)}
            layer_plan = reconstruct(model, adapter, PruningPlan([layer_plan]), statistics, config.reconstruct, stream_target).layers[0]
            plan.layers[index] = layer_plan
            _mask_layer(layer, adapter, layer_plan)
            inputs.run(layer, index, advance=True)
    finally:
        model.train(was_training)
    return plan
