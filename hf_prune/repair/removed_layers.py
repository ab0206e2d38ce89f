"""Training-free repair for removed layers: refit the preceding MLP to add what they added.

Removing layers `i..j` leaves the residual stream short of `D = h_{j+1} − h_i`, the sum of what
those layers wrote into it. In a pre-norm block the MLP of the last kept layer before them, `p`,
writes `W a` straight into the stream, so the same least squares that repairs pruned neurons
(docs/methods.md §4.1, §4.4) can make it write `W a + D` instead:

    W'_S = (W G[:, S] + C[:, S]) (G[S, S] + λI)⁻¹,   C = Σ_tokens D aᵀ

(`S`: the neurons of `p` that stay; `G`: the Gram matrix of `a`, which the calibration pass
already holds). This is ReplaceMe's idea (Shopkhoev et al., 2025: a linear stand-in for the
removed blocks merged into the preceding MLP), fitted over all of `W` rather than a square map
after it. `C` needs the plan, so it comes from a second pass over the calibration windows that
stops after the last removed layer (`removed_run_cross_term`, which every driver runs: on the dense
model in memory, or layer by layer in `hf_prune.engine.core`). Runs that start at layer 0, follow a layer whose MLP is
removed, or follow a layer whose MLP output is normalised before it joins the stream (Gemma 3,
post-LayerNorm encoders) are left as they are, with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.distributed import local_share, sum_across_processes
from ..calibration.layer_inputs import capture_layer_inputs
from ..groups import ArchitectureAdapter
from ..groups.base import channels_last, in_features, out_features
from ..plan import PruningPlan

logger = logging.getLogger(__name__)

#: The `reconstruct` methods that refit by least squares, and so fold removed layers in.
FOLDING_REPAIRS = ("lstsq", "ispasp")


@dataclass(frozen=True)
class RemovedRun:
    """Consecutive removed layers `first..last` and the kept layer `writer` just before them."""

    writer: int
    first: int
    last: int


def removed_runs(model: nn.Module, adapter: ArchitectureAdapter, plan: PruningPlan) -> list[RemovedRun]:
    """The runs of removed layers whose preceding layer's MLP can take their place."""
    layers = adapter.layers(model)
    by_index = {layer_plan.layer: layer_plan for layer_plan in plan.layers}
    removed = [index for index in range(len(layers)) if index in by_index and not by_index[index].keep_layer]
    runs: list[RemovedRun] = []
    for index in removed:
        if runs and runs[-1].last == index - 1:
            runs[-1] = RemovedRun(runs[-1].writer, runs[-1].first, index)
        elif index > 0 and (index - 1) not in removed:
            runs.append(RemovedRun(index - 1, index, index))
        else:
            runs.append(RemovedRun(-1, index, index))
    usable = []
    for run in runs:
        writer_plan = by_index.get(run.writer)
        if run.writer < 0 or (writer_plan is not None and not writer_plan.keep_mlp):
            logger.warning(
                "Removed layers %d-%d have no preceding MLP to take their place; they are not folded.",
                run.first,
                run.last,
            )
        elif not adapter.mlp_writes_stream(layers[run.writer]):
            logger.warning(
                "Layer %d's MLP output is not added straight into the stream; removed layers %d-%d are not folded.",
                run.writer,
                run.first,
                run.last,
            )
        else:
            usable.append(run)
    return usable


def add_stream_target(
    target: torch.Tensor, writer_input: torch.Tensor, before: torch.Tensor, after: torch.Tensor
) -> None:
    """`target += Σ_tokens (after − before) aᵀ`, a float32 product added into float64 (pre-norm
    transformers: channels last in the stream and in the writer's input `a`)."""
    difference = (after - before).reshape(-1, after.shape[-1]).float()
    target += (difference.T @ writer_input.reshape(-1, writer_input.shape[-1]).float()).double()


def empty_target(down_proj: nn.Module, device: torch.device) -> torch.Tensor:
    """A zero `C` for `down_proj`: its output (stream) channels × its input channels, float64."""
    return torch.zeros(out_features(down_proj), in_features(down_proj), dtype=torch.float64, device=device)


def run_target(
    down_proj: nn.Module, writer_inputs: list[torch.Tensor], before: list[torch.Tensor], after: list[torch.Tensor]
) -> torch.Tensor:
    """`C` from per-batch writer inputs and the stream before and after the removed run."""
    target = empty_target(down_proj, before[0].device)
    for writer_input, start, end in zip(writer_inputs, before, after):
        add_stream_target(target, writer_input, start, end)
    return target


@torch.no_grad()
def removed_run_cross_term(
    run: RemovedRun,
    down_proj: nn.Module,
    writer_inputs: list[torch.Tensor],
    before: list[torch.Tensor],
    run_layers: Callable[[range, list[torch.Tensor]], list[torch.Tensor]],
) -> torch.Tensor:
    """`C = Σ_tokens D aᵀ` for one run, summed across processes: `before` (per batch: the writer's
    dense outputs) run through the removed layers `run.first..run.last` by `run_layers(indices, stream)`
    (every driver's own way to run layers: in memory, or each read from the shards for the while),
    against the writer's `down_proj` inputs `a`. The one computation of every driver's target."""
    after = run_layers(range(run.first, run.last + 1), before)
    target = run_target(down_proj, writer_inputs, before, after)
    sum_across_processes([target])
    return target


@torch.no_grad()
def removed_layer_targets(
    model: nn.Module, adapter: ArchitectureAdapter, batches: Iterable[torch.Tensor], runs: list[RemovedRun]
) -> dict[int, torch.Tensor]:
    """Per writer layer, `C = Σ_tokens D aᵀ` (stream channels × MLP channels, float64): what the
    removed run after it added to the stream, against the writer's `down_proj` input `a`, on the
    dense model in memory (the one-pass prune). The dense stream walks the layers up to the last
    writer (`layer_inputs`: one layer at a time, as the whole-model pass runs them)."""
    if not runs:
        return {}
    layers = adapter.layers(model)
    device = next(model.parameters()).device
    inputs = capture_layer_inputs(model, adapter, local_share(list(batches)), device)
    writers = {run.writer: run for run in runs}
    targets = {}
    for index in tqdm(range(max(writers) + 1), desc="removed-layer targets", unit="layer", leave=False):
        inputs.hidden = inputs.entering(index, inputs.hidden)
        writer_inputs: list[torch.Tensor] = []
        down_proj = layers[index].get_submodule(adapter.down_proj) if index in writers else None
        handles = []
        if down_proj is not None:
            keep = lambda module, args, sink=writer_inputs: sink.append(channels_last(module, args[0]))  # noqa: E731
            handles.append(down_proj.register_forward_pre_hook(keep))
        try:
            inputs.run(layers[index], index, advance=True)
        finally:
            for handle in handles:
                handle.remove()
        if down_proj is not None:
            run_layers = partial(inputs.through, layers)
            run = writers[index]
            targets[index] = removed_run_cross_term(run, down_proj, writer_inputs, inputs.hidden, run_layers)
    return targets
