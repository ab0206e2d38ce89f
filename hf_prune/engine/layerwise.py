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

`propagate="both"` carries the dense model's activations alongside, and refits each changed
layer's MLP (in pre-norm families, where it writes the stream directly) so that the pruned stream
after the layer comes as close as least squares allows to the dense stream at the same point:
the refit then corrects the drift of all earlier layers, not only this layer's own loss, and it
absorbs what removed layers added (the dense stream target runs through them). One more forward
pass of the dense stream, and one more of the pruned stream in each refitted layer. With
`refine_epochs`, each changed layer is then fitted to the dense stream by gradient steps on all
its kept weights (`block_refinement`).

Method notes and sources: docs/methods.md §4.6.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation import RemovalCounts, plan_layer, remove_blocks
from ..allocation.base import LayerScores
from ..calibration.distributed import local_share, sum_across_processes, sum_numbers
from ..calibration.layer_inputs import LayerInputs, capture_layer_inputs, first_output
from ..calibration.statistics import (
    CalibrationStatistics,
    ChannelStatistics,
    collect_statistics,
    register_layer_hooks,
    sum_statistics,
)
from ..config import PruningConfig
from ..criteria import Criterion, ScoringContext
from ..finite import UNCHANGED, check_finite_statistics
from ..groups import ArchitectureAdapter
from ..groups.base import channels_last
from ..masking import masked_slices
from ..plan import LayerPlan, PruningPlan
from ..repair.block_refinement import refine_toward_dense
from ..repair.least_squares import reconstruct
from ..repair.removed_layers import (
    FOLDING_REPAIRS,
    RemovedRun,
    add_stream_target,
    empty_target,
    removed_runs,
    run_target,
)

logger = logging.getLogger(__name__)

BLOCK_KINDS = ("layers", "attention_branches", "mlp_branches")


def _rank_blocks(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    batches: list[torch.Tensor],
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
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
def _removed_layer_target(
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
    after = _run_layers(layers, range(run.first, run.last + 1), before, inputs)
    target = run_target(layers[run.writer].get_submodule(adapter.down_proj), writer_inputs, before, after)
    sum_across_processes([target])
    return target


def _run_layers(layers, indices: range, stream: list[torch.Tensor], inputs: LayerInputs) -> list[torch.Tensor]:
    """`stream` (one tensor per batch) run through the layers `indices` as they are now (and what
    runs before each outside the layer stack, `LayerInputs.entering`)."""
    for index in indices:
        stream = inputs.entering(index, stream)
        stream = [
            first_output(layers[index](h, *a, **k))
            for h, a, k in zip(stream, inputs.args[index], inputs.kwargs[index])
        ]
    return stream


@torch.no_grad()
def _refit_toward_dense(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    layer_plan: LayerPlan,
    inputs: LayerInputs,
    dense_after: list[torch.Tensor],
    damping: float,
) -> None:
    """Refit the layer's `down_proj` (kept columns) so that the pruned stream after it comes as
    close as least squares allows to the dense model's stream at the same point (`dense_after`):
    target `W a + (h_dense − h_pruned)`, which also absorbs the error of earlier layers."""
    index = layer_plan.layer
    layer = adapter.layers(model)[index]
    down_proj = layer.get_submodule(adapter.down_proj)
    gram = ChannelStatistics(with_gram=True)
    target = empty_target(down_proj, dense_after[0].device)
    current: dict[str, torch.Tensor] = {}
    batch = iter(dense_after)

    def keep_input(module, args):
        current["a"] = channels_last(module, args[0])
        gram.add(current["a"])

    def add_target(module, args, kwargs, output):
        add_stream_target(target, current.pop("a"), first_output(output), next(batch))

    handles = [
        down_proj.register_forward_pre_hook(keep_input),
        layer.register_forward_hook(add_target, with_kwargs=True),
    ]
    try:
        inputs.run(layer, index, advance=False)
    finally:
        for handle in handles:
            handle.remove()
    sum_across_processes([gram.gram, target])
    gram.count = int(sum_numbers([gram.count])[0])
    statistics = CalibrationStatistics(consumers={(index, "mlp"): gram})
    plan = PruningPlan([layer_plan])
    reconstruct(model, adapter, plan, statistics, "lstsq", {index: target}, branches=("mlp",), damping=damping)


def _removed_after(plan: PruningPlan, index: int) -> range:
    """The removed layers right after layer `index` (the pruned model skips them)."""
    following = index + 1
    while following < len(plan.layers) and not plan.layers[following].keep_layer:
        following += 1
    return range(index + 1, following)


@torch.no_grad()
def prune_layer_by_layer(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    config: PruningConfig,
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
    windows: torch.Tensor,
    toward_dense: bool = False,
) -> PruningPlan:
    """Plan, repair and mask `model` in place one layer at a time; returns the plan to cut."""
    batches = local_share(list(windows.split(config.batch_size)))
    plan = PruningPlan.keep_all(model, adapter)
    _rank_blocks(model, adapter, plan, batches, criteria, targets, config)
    requirements = set().union(*(c.requires for c in criteria.values()))
    if config.reconstruct != "none":
        requirements |= {"moments", "mlp_gram"}
    toward_dense = toward_dense and config.reconstruct in FOLDING_REPAIRS
    # Carrying the dense stream, its target already holds what removed layers add: no separate fold.
    folding = config.reconstruct in FOLDING_REPAIRS and not toward_dense
    runs = {run.writer: run for run in removed_runs(model, adapter, plan)} if folding else {}
    device = next(model.parameters()).device
    inputs = capture_layer_inputs(model, adapter, batches, device)
    layers = adapter.layers(model)
    dense = [h.clone() for h in inputs.hidden] if toward_dense else None
    changed = False
    pruned_before = False  # a kept layer has been planned and masked: the model is no longer what it was
    dense_done = -1  # the last layer the dense stream has already passed (run ahead past removed layers)
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(len(layers)), desc="pruning layer by layer", unit="layer"):
            layer, layer_plan = layers[index], plan.layers[index]
            inputs.hidden = inputs.entering(index, inputs.hidden)  # e.g. a stage's downsampling, kept as is
            if dense is not None and index > dense_done:  # the dense stream after this layer, before it changes
                dense = _run_layers(layers, range(index, index + 1), dense, inputs)
            if not layer_plan.keep_layer:
                changed = True
                continue  # the pruned model skips it: its inputs go on unchanged
            statistics = CalibrationStatistics(requirements=frozenset(requirements))
            handles = register_layer_hooks(statistics, index, layer, adapter, None)
            writer_inputs: list[torch.Tensor] = []
            if index in runs:
                handles.append(
                    layer.get_submodule(adapter.down_proj).register_forward_pre_hook(
                        lambda m, args, sink=writer_inputs: sink.append(channels_last(m, args[0]))
                    )
                )
            try:
                inputs.run(layer, index, advance=False)
            finally:
                for handle in handles:
                    handle.remove()
            statistics.batches, statistics.tokens = len(batches), sum(b.numel() for b in batches)
            sum_statistics(statistics)
            check_finite_statistics(
                statistics,
                adapter,
                model,
                f"The layers before layer {index} were already pruned in place (propagate={config.propagate!r} goes "
                "one layer at a time): load the model again before retrying."
                if pruned_before
                else UNCHANGED,
            )
            plan_layer(
                ScoringContext(model, adapter, statistics, batch_size=config.batch_size, damping=config.damping),
                criteria,
                layer_plan,
                targets,
            )
            removed_layer_target = None
            if index in runs:
                removed_layer_target = {
                    index: _removed_layer_target(model, adapter, runs[index], inputs, writer_inputs)
                }
            layer_plan = reconstruct(
                model,
                adapter,
                PruningPlan([layer_plan]),
                statistics,
                config.reconstruct,
                removed_layer_target,
                damping=config.damping,
            ).layers[0]
            plan.layers[index] = layer_plan
            _mask_layer(layer, adapter, layer_plan)
            changed = changed or layer_plan.changes_attention or layer_plan.changes_mlp
            if dense is not None and changed:
                ahead = _removed_after(plan, index)
                dense = _run_layers(layers, ahead, dense, inputs)  # where the next kept layer reads it
                dense_done = ahead.stop - 1
                if layer_plan.keep_mlp and adapter.mlp_writes_stream(layer):
                    _refit_toward_dense(model, adapter, layer_plan, inputs, dense, config.damping)
                if config.refine_epochs:
                    before, after = refine_toward_dense(
                        layer,
                        index,
                        inputs,
                        dense,
                        config.refine_epochs,
                        config.refine_lr,
                        remask=partial(_mask_layer, layer, adapter, layer_plan),
                    )
                    logger.info("layer %d: stream error %.4g -> %.4g after refinement", index, before, after)
            pruned_before = True
            inputs.run(layer, index, advance=True)
    finally:
        model.train(was_training)
    return plan
