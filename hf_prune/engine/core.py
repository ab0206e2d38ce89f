"""The pruning engine: what every prune shares, and the one layer-by-layer loop.

Three drivers prune a model: the one-pass prune (`HFPruner.prune`, every layer measured on the
dense model's activations in one whole-model pass), the in-memory layer-by-layer prune
(`propagate="pruned"` or `"both"`, `hf_prune.engine.layerwise`) and the low-memory prune
(`low_memory=True`, `hf_prune.engine.low_memory`, one layer's weights in memory at a time). They
share, each defined once here:

- `statistics_requirements`: which statistics the criteria and the repair read;
- `check_layer_local`: the refusal of criteria that need whole-model passes, where layers go one at a time;
- `check_untied_heads`: the refusal of heads tied across layers, where layers are planned one at a time;
- `calibration_summary`: the report's calibration record (windows, tokens);
- `repair.removed_layers.removed_run_cross_term`: what a run of removed layers added to the stream, for the
  repair that folds it in (the one-pass prune's `removed_layer_targets` walks the dense model to it);
- `cut_checked`: the final cut with its parameter-count check (`HFPruner.apply` and the low-memory prune).

The two layer-by-layer drivers also share `prune_layers`, the loop itself: for each layer in turn,
measure it on its calibration inputs, plan it (`allocation.plan_layer`), repair it
(`repair.least_squares.reconstruct`), and feed the next layer. They differ only in a `LayerSource`
(where a layer's weights and its calibration inputs come from: the model in memory, or the
safetensors shards one layer at a time) and in the stream that feeds the next layer:

- `"unpruned"`: the dense layer's outputs (the one-pass prune's activations, layer by layer);
- `"pruned"`: the pruned and repaired layer's outputs (SparseGPT's sequential calibration);
- `"both"`: the pruned outputs, with the dense stream carried alongside as the target each changed
  layer's MLP is refitted toward (and, with `refine_epochs`, its kept weights; docs/methods.md §4.6).

Method notes and sources: docs/methods.md §4.6.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Literal

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from ..allocation import RemovalCounts, group_scores, plan_layer, remove_blocks
from ..calibration.distributed import local_share, sum_across_processes, sum_numbers
from ..calibration.layer_inputs import LayerInputs, capture_layer_inputs, first_output
from ..calibration.statistics import (
    CalibrationStatistics,
    ChannelStatistics,
    InfluenceRecorder,
    Requirement,
    batch_tokens,
    register_layer_hooks,
    sum_statistics,
)
from ..config import PruningConfig
from ..criteria import Criterion, ScoringContext, available_criteria, get_criterion
from ..errors import InvalidPruningTargetError
from ..evaluation import parameter_count
from ..finite import UNCHANGED, check_finite_statistics
from ..groups import ArchitectureAdapter
from ..groups.base import channels_last, set_config_field
from ..kinds import BLOCK_KINDS
from ..masking import masked_slices
from ..output.checkpoint import FormatDecision
from ..plan import LayerPlan, PruningPlan
from ..repair.block_refinement import refine_toward_dense
from ..repair.expert_merge import merge_removed_experts
from ..repair.least_squares import reconstruct
from ..repair.removed_layers import (
    FOLDING_REPAIRS,
    add_stream_target,
    empty_target,
    removed_run_cross_term,
    removed_runs,
)
from ..surgery import apply_plan

logger = logging.getLogger(__name__)

Stream = Literal["unpruned", "pruned", "both"]


# ----------------------------------------------------------------- model and config
def model_class_for(config, from_gguf: bool) -> type[PreTrainedModel]:
    """The transformers class a config names (`architectures[0]`), else the Auto class for it."""
    architectures = getattr(config, "architectures", None) or []
    found = getattr(transformers, architectures[0], None) if architectures else None
    if found is not None:
        return found
    return AutoModelForCausalLM if from_gguf else AutoModel


def detach_shared_config(model: PreTrainedModel) -> None:
    """Give the model a private deep copy of its config before pruning rewrites it, so a config
    object the caller shares with other models is never changed; every module follows."""
    shared, private = model.config, copy.deepcopy(model.config)
    pairs = {id(shared): private}
    stack = [(shared, private)]
    while stack:  # nested configs (`text_config`, ...) that modules hold follow too
        old, new = stack.pop()
        for key, value in vars(old).items():
            if isinstance(value, PretrainedConfig) and isinstance(getattr(new, key, None), PretrainedConfig):
                pairs[id(value)] = getattr(new, key)
                stack.append((value, getattr(new, key)))
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and id(config) in pairs:
            module.config = pairs[id(config)]


# ----------------------------------------------------------------- shared by every driver
def statistics_requirements(
    criteria: Mapping[str, Criterion], config: PruningConfig | None = None, targets: RemovalCounts | None = None
) -> set[Requirement]:
    """The statistics the criteria and the repair read: each criterion's `requires`, and for a
    least-squares repair (`config.reconstruct`; no config: the criteria alone) the branch moments and
    MLP Gram (`stream_gram` too when stream channels go); for `expert_repair="merge"`, the routing."""
    requirements = set().union(*(criterion.requires for criterion in criteria.values()))
    if config is not None and config.reconstruct != "none":
        requirements |= {"moments", "mlp_gram"} | ({"stream_gram"} if targets.stage_channels else set())
    if config is not None and config.expert_repair == "merge" and any(targets.counts.experts.values()):
        requirements.add("routing")
    return requirements


def check_layer_local(criteria: Mapping[str, Criterion], mode: str, fix: str) -> None:
    """Refuse criteria that need whole-model passes (gradients, or the calibration windows run
    through the whole model) where `mode` measures one layer at a time; `fix` ends the message."""
    for kind, criterion in criteria.items():
        if "gradients" in criterion.requires or criterion.needs_windows:
            local = [
                name
                for name in available_criteria()
                if kind in get_criterion(name).kinds
                and "gradients" not in get_criterion(name).requires
                and not get_criterion(name).needs_windows
            ]
            example = "activation" if "activation" in local else local[0]
            raise InvalidPruningTargetError(
                f"criterion {criterion.name!r} (for {kind}) needs whole-model forward and backward passes, which "
                f"{mode} never runs (it measures one layer at a time); choose a layer-local criterion (one of "
                f"{', '.join(local)}; e.g. criterion={{'{kind}': '{example}'}}) or {fix}."
            )


def check_untied_heads(adapter: ArchitectureAdapter, removal: RemovalCounts, mode: str, fix: str) -> None:
    """Refuse heads and KV groups where the adapter ties them across layers (`ArchitectureAdapter.tied_heads`: one
    head set for every layer, chosen from all layers' scores at once) and `mode` plans one layer at a time."""
    counts = removal.counts
    if adapter.tied_heads and any(
        any(c.values()) for c in (counts.kv_groups, counts.heads_per_group, counts.mha_heads)
    ):
        raise InvalidPruningTargetError(
            "this model's attention heads share per-head state computed once for every layer (a position bias), so "
            f"every layer must keep the same heads, chosen from all layers' scores at once; {mode} plans one layer "
            f"at a time: {fix}, or leave attention_heads and kv_groups out."
        )


def calibration_summary(config: PruningConfig, windows: int, tokens: int) -> dict:
    """The report's calibration record: the configured source, how many windows (images) and tokens
    (`calibration.statistics.batch_tokens`: an image counts once) were measured."""
    return {"source": config.to_dict()["calibration"], "windows": windows, "seq_len": config.seq_len, "tokens": tokens}


def cut_checked(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    plan: PruningPlan,
    decision: FormatDecision,
    dense: nn.Module | None = None,
    cut: Callable[[nn.Module, ArchitectureAdapter, PruningPlan], None] = apply_plan,
) -> tuple[int, int]:
    """Cut `plan` out of `model` (`surgery.apply_plan`; the low-memory prune, whose layers are already
    cut, passes what is left), write the format's config fields, and check the parameter count
    against the plan's own count (`PruningPlan.removed_parameter_count` on `dense`, the model's
    shapes before any cut): a disagreement is a bug, never silent. Returns (before, after)."""
    dense = model if dense is None else dense
    before = parameter_count(dense)
    expected_after = before - plan.removed_parameter_count(dense, adapter)
    detach_shared_config(model)
    cut(model, adapter, plan)
    for key, value in decision.config_fields.items():
        set_config_field(model.config, key, value)
    after = parameter_count(model)
    if after != expected_after:
        raise RuntimeError(f"surgery left {after:,} parameters, the plan predicts {expected_after:,}")
    return before, after


# ----------------------------------------------------------------- layer sources
class LayerSource:
    """Where the layer loop's weights and calibration inputs come from: here, a model in memory
    (every weight present; a pruned layer is masked, keeping its shapes, and cut at the end)."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter):
        self.model, self.adapter = model, adapter

    def capture(self, batches: list[torch.Tensor]) -> LayerInputs:
        """Every layer's calibration arguments and the first layer's hidden states."""
        return capture_layer_inputs(self.model, self.adapter, batches, next(self.model.parameters()).device)

    def load(self, index: int) -> None:
        """Bring layer `index`'s weights in (in memory they are there)."""

    def loaded(self, index: int) -> bool:
        return True

    def entering(self, inputs: LayerInputs, index: int, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """`stream` through what the model runs before layer `index` outside the stack."""
        return inputs.entering(index, stream)

    def plan_ready(self, plan: PruningPlan) -> None:
        """The removed blocks are chosen: which layers stay is known from here on."""

    def settle(self, index: int, layer: nn.Module, layer_plan: LayerPlan) -> None:
        """The pruned layer as the next layer reads it (in memory: masked, as it already is)."""

    def release(self, index: int, layer: nn.Module, layer_plan: LayerPlan | None) -> None:
        """Done with layer `index` (`layer_plan` None: it was only run, never pruned)."""

    def outcome(self, index: int, pruned_before: bool, stream: Stream) -> str:
        """The end of a `NonFiniteError` raised by layer `index`'s statistics."""
        if not pruned_before:
            return UNCHANGED
        return (
            f"The layers before layer {index} were already pruned in place (propagate={stream!r} goes one layer "
            "at a time): load the model again before retrying."
        )

    @torch.no_grad()
    def run_layers(self, indices: range, stream: list[torch.Tensor], inputs: LayerInputs) -> list[torch.Tensor]:
        """`stream` (one tensor per batch) run through the layers `indices` as they are now (and what
        runs before each outside the layer stack), each loaded for the while when it is not."""
        layers = self.adapter.layers(self.model)
        for index in indices:
            stream = self.entering(inputs, index, stream)
            loaded_here = not self.loaded(index)
            if loaded_here:
                self.load(index)
            stream = [
                first_output(layers[index](h, *a, **k))
                for h, a, k in zip(stream, inputs.args[index], inputs.kwargs[index])
            ]
            if loaded_here:
                self.release(index, layers[index], None)
        return stream


# ----------------------------------------------------------------- the loop's steps
@torch.no_grad()
def mask_layer(layer: nn.Module, adapter: ArchitectureAdapter, layer_plan: LayerPlan) -> None:
    """Zero what the plan removes in this layer, so its outputs are the pruned layer's."""
    for piece in masked_slices(adapter, layer, layer_plan):
        layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()


def measure_layer(
    source: LayerSource,
    inputs: LayerInputs,
    index: int,
    requirements: set[Requirement],
    advance: bool,
    tokens: int,
    outcome: str,
    extra_hooks: list | None = None,
) -> CalibrationStatistics:
    """Run layer `index` on its calibration inputs with the statistics hooks (the whole-model pass's,
    `register_layer_hooks`), sum across processes and check the result finite. With `advance`, the
    outputs replace the inputs (the dense stream goes on)."""
    layer = source.adapter.layers(source.model)[index]
    statistics = CalibrationStatistics(requirements=frozenset(requirements))
    recorder = InfluenceRecorder(statistics) if "influence" in requirements else None
    handles = register_layer_hooks(statistics, index, layer, source.adapter, recorder) + list(extra_hooks or [])
    try:
        inputs.run(layer, index, advance=advance)
    finally:
        for handle in handles:
            handle.remove()
    statistics.batches, statistics.tokens = len(inputs.hidden), tokens
    sum_statistics(statistics)
    if recorder:
        recorder.finish()
    check_finite_statistics(statistics, source.adapter, source.model, outcome)
    return statistics


@torch.no_grad()
def refit_toward_dense(
    source: LayerSource, layer_plan: LayerPlan, inputs: LayerInputs, dense_after: list[torch.Tensor], damping: float
) -> None:
    """Refit the layer's `down_proj` (kept columns) so that the pruned stream after it comes as
    close as least squares allows to the dense model's stream at the same point (`dense_after`):
    target `W a + (h_dense − h_pruned)` (the cross term `C = Σ (h_dense − h_pruned) aᵀ` added to the
    least squares), which also absorbs the error of earlier layers."""
    model, adapter, index = source.model, source.adapter, layer_plan.layer
    layer = adapter.layers(model)[index]
    down_proj = layer.get_submodule(adapter.down_proj)
    gram = ChannelStatistics(with_gram=True)
    cross_term = empty_target(down_proj, dense_after[0].device)
    current: dict[str, torch.Tensor] = {}
    batch = iter(dense_after)

    def keep_input(module, args):
        current["a"] = channels_last(module, args[0])
        gram.add(current["a"])

    def add_target(module, args, kwargs, output):
        add_stream_target(cross_term, current.pop("a"), first_output(output), next(batch))

    handles = [
        down_proj.register_forward_pre_hook(keep_input),
        layer.register_forward_hook(add_target, with_kwargs=True),
    ]
    try:
        inputs.run(layer, index, advance=False)
    finally:
        for handle in handles:
            handle.remove()
    sum_across_processes([gram.gram, cross_term])
    gram.count = int(sum_numbers([gram.count])[0])
    statistics = CalibrationStatistics(consumers={(index, "mlp"): gram})
    plan = PruningPlan([layer_plan])
    reconstruct(model, adapter, plan, statistics, "lstsq", {index: cross_term}, branches=("mlp",), damping=damping)


def removed_after(plan: PruningPlan, index: int) -> range:
    """The removed layers right after layer `index` (the pruned model skips them)."""
    following = index + 1
    while following < len(plan.layers) and not plan.layers[following].keep_layer:
        following += 1
    return range(index + 1, following)


# ----------------------------------------------------------------- the loop
@torch.no_grad()
def rank_blocks(
    source: LayerSource,
    plan: PruningPlan,
    batches: list[torch.Tensor],
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
    config: PruningConfig,
) -> None:
    """Drop layers and branches as the one-pass prune would (`allocation.remove_blocks`, ranked
    across the model): a first pass scores every layer's blocks on the dense stream, each layer
    measured with the block criteria's statistics only (`measure_layer`)."""
    kinds = [kind for kind in sorted(BLOCK_KINDS) if getattr(targets, kind)]
    if not kinds:
        return
    requirements = statistics_requirements({kind: criteria[kind] for kind in kinds})
    inputs = source.capture(batches) if batches and requirements else None
    tokens = batch_tokens(batches)
    layers = source.adapter.layers(source.model)
    scores = {}
    for index in tqdm(range(len(layers)), desc="scoring blocks", unit="layer"):
        if inputs is not None:
            inputs.hidden = source.entering(inputs, index, inputs.hidden)
        source.load(index)
        statistics = CalibrationStatistics(requirements=frozenset(requirements))
        if inputs is not None:
            outcome = source.outcome(index, False, "unpruned")
            statistics = measure_layer(source, inputs, index, requirements, True, tokens, outcome)
        context = ScoringContext(source.model, source.adapter, statistics, batch_size=config.batch_size)
        for kind in kinds:
            scores[(index, kind)] = group_scores(context, criteria[kind], index, kind)
        source.release(index, layers[index], None)
        statistics = None  # drop this layer's sums before the next
    remove_blocks(plan, targets, lambda index, kind: scores[(index, kind)])


@torch.no_grad()
def prune_layers(
    source: LayerSource,
    plan: PruningPlan,
    config: PruningConfig,
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
    batches: list[torch.Tensor],
    stream: Stream,
) -> PruningPlan:
    """Plan, repair and prune every kept layer of `plan` (its removed blocks already chosen) one at
    a time, on `batches` (this process's share) fed through the layers as `stream` says; fills `plan`.

    Per layer: the stream enters it (what runs before it outside the stack), the dense stream
    advances (`"both"`), the layer is measured (`measure_layer`), planned, the cross term of the
    removed layers after it taken (`removed_run_cross_term`, when a removed run follows it and the
    repair folds), repaired, masked, refitted toward the dense stream (`"both"`), settled (cut, in
    low memory), and run to feed the next."""
    model, adapter = source.model, source.adapter
    # The blocks are ranked already (`rank_blocks`): their criteria's statistics (influence) are not measured again.
    requirements = statistics_requirements(
        {kind: criterion for kind, criterion in criteria.items() if kind not in BLOCK_KINDS}, config, targets
    )
    toward_dense = stream == "both" and config.reconstruct in FOLDING_REPAIRS
    # Carrying the dense stream, its target already holds what removed layers add: no separate fold.
    folding = config.reconstruct in FOLDING_REPAIRS and not toward_dense and bool(batches)
    runs = {run.writer: run for run in removed_runs(model, adapter, plan)} if folding else {}
    tokens = batch_tokens(batches)
    inputs = source.capture(batches) if batches else None
    layers = adapter.layers(model)
    dense = [h.clone() for h in inputs.hidden] if toward_dense else None
    changed = False
    pruned_before = False  # a kept layer has been planned and pruned: the model is no longer what it was
    dense_done = -1  # the last layer the dense stream has already passed (run ahead past removed layers)
    was_training = model.training
    model.eval()
    try:
        for index in tqdm(range(len(layers)), desc="pruning layer by layer", unit="layer"):
            layer_plan = plan.layers[index]
            if inputs is not None:  # the stream as this layer reads it (e.g. a stage's downsampling, kept as is)
                inputs.hidden = source.entering(inputs, index, inputs.hidden)
            if dense is not None and index > dense_done:  # the dense stream after this layer, before it changes
                dense = source.run_layers(range(index, index + 1), dense, inputs)
            if not layer_plan.keep_layer:
                changed = True
                if inputs is not None and stream == "unpruned":  # the dense stream runs through it
                    source.load(index)
                    inputs.run(layers[index], index, advance=True)
                    source.release(index, layers[index], None)
                continue  # the pruned model skips it: its inputs go on unchanged
            source.load(index)
            layer = layers[index]
            statistics = CalibrationStatistics(requirements=frozenset(requirements))  # nothing measured: data-free
            writer_inputs: list[torch.Tensor] = []
            if inputs is not None:
                hooks = []
                if index in runs:
                    keep = lambda m, args, sink=writer_inputs: sink.append(channels_last(m, args[0]))  # noqa: E731
                    hooks.append(layer.get_submodule(adapter.down_proj).register_forward_pre_hook(keep))
                statistics = measure_layer(
                    source,
                    inputs,
                    index,
                    requirements,
                    advance=stream == "unpruned",  # the dense outputs are all the next layer needs
                    tokens=tokens,
                    outcome=source.outcome(index, pruned_before, stream),
                    extra_hooks=hooks,
                )
            context = ScoringContext(model, adapter, statistics, batch_size=config.batch_size, damping=config.damping)
            plan_layer(context, criteria, layer_plan, targets)
            if config.expert_repair == "merge":
                merge_removed_experts(model, adapter, PruningPlan([layer_plan]), statistics)
            cross_term = None
            if index in runs:
                # Unpruned propagation has already advanced the stream past the (still dense) writer.
                before = inputs.hidden if stream == "unpruned" else inputs.outputs(layer, index)
                run_layers = partial(source.run_layers, inputs=inputs)
                down_proj = layer.get_submodule(adapter.down_proj)
                cross_term = {index: removed_run_cross_term(runs[index], down_proj, writer_inputs, before, run_layers)}
            # `ispasp` may re-select the layer's groups: prune (and record) what the repair chose.
            layer_plan = reconstruct(
                model,
                adapter,
                PruningPlan([layer_plan]),
                statistics,
                config.reconstruct,
                cross_term,
                damping=config.damping,
            ).layers[0]
            plan.layers[index] = layer_plan
            mask_layer(layer, adapter, layer_plan)
            changed = changed or layer_plan.changes_attention or layer_plan.changes_mlp
            if dense is not None and changed:
                ahead = removed_after(plan, index)
                dense = source.run_layers(ahead, dense, inputs)  # where the next kept layer reads it
                dense_done = ahead.stop - 1
                if layer_plan.keep_mlp and adapter.mlp_writes_stream(layer):
                    refit_toward_dense(source, layer_plan, inputs, dense, config.damping)
                if config.refine_epochs:
                    errors = refine_toward_dense(
                        layer,
                        index,
                        inputs,
                        dense,
                        config.refine_epochs,
                        config.refine_lr,
                        remask=partial(mask_layer, layer, adapter, layer_plan),
                    )
                    logger.info("layer %d: stream error %.4g -> %.4g after refinement", index, *errors)
            pruned_before = True
            source.settle(index, layer, layer_plan)
            if inputs is not None and stream != "unpruned":
                inputs.run(layer, index, advance=True)
            source.release(index, layer, layer_plan)
            statistics = None  # drop this layer's sums before the next
    finally:
        model.train(was_training)
    return plan


def prune_by_layer(
    source: LayerSource,
    config: PruningConfig,
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
    batches: list[torch.Tensor],
    stream: Stream,
) -> PruningPlan:
    """Both layer-by-layer drivers: rank removed blocks (`rank_blocks`), then prune every kept layer
    (`prune_layers`); returns the plan (in memory the layers are masked; from the shards, cut)."""
    plan = PruningPlan.keep_all(source.model, source.adapter)
    rank_blocks(source, plan, batches, criteria, targets, config)
    source.plan_ready(plan)
    return prune_layers(source, plan, config, criteria, targets, batches, stream)


def layer_batches(windows: torch.Tensor, config: PruningConfig) -> list[torch.Tensor]:
    """This process's calibration batches (`calibration.distributed.local_share`)."""
    return local_share(list(windows.split(config.batch_size)))
