"""`HFPruner`: load a transformers model, plan a prune, cut it, save a standard checkpoint."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import transformers
from accelerate import init_empty_weights
from huggingface_hub import HfApi
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file

from .allocation import RemovalCounts, build_plan, plan_for, resolve_counts
from .calibration.distributed import from_main_process, is_main_process
from .calibration.sources import token_windows
from .calibration.statistics import CalibrationStatistics, batch_tokens, collect_statistics
from .config import BUDGET_TARGETS, PruningConfig
from .criteria import Criterion, ScoringContext, available_criteria, get_criterion
from .criteria.random import RandomCriterion
from .engine.core import (
    calibration_summary,
    check_layer_local,
    check_untied_heads,
    cut_checked,
    model_class_for,
    statistics_requirements,
)
from .engine.layerwise import prune_layer_by_layer
from .errors import InvalidPruningTargetError, NotPrunedError, UnsupportedArchitectureError, VanillaFormatError
from .evaluation import flops_per_token, parameter_count
from .finite import check_finite_weights
from .groups import ArchitectureAdapter, get_adapter
from .output.atomic import write_atomically
from .output.card import CardFacts, CardInputs, write_model_card
from .output.checkpoint import FormatDecision, decide_format, meta_copy, write_loader_config
from .output.hub import push_saved
from .plan import PruningPlan
from .repair.expert_merge import merge_removed_experts
from .repair.least_squares import reconstruct
from .repair.removed_layers import FOLDING_REPAIRS, removed_layer_targets, removed_runs
from .report import PruningReport
from .surgery import apply_plan

logger = logging.getLogger(__name__)

PROCESSOR_CONFIG = "preprocessor_config.json"
# Keywords of `from_pretrained` that also apply to the config and the tokenizer.
_SHARED_KWARGS = ("gguf_file", "revision", "token", "cache_dir", "local_files_only", "subfolder")


def _file_kwargs(shared: dict) -> dict:
    """The shared keywords that `cached_file` takes (all but `gguf_file`)."""
    return {key: value for key, value in shared.items() if key != "gguf_file"}


def _without_gguf_marker(model: PreTrainedModel) -> PreTrainedModel:
    """GGUF checkpoints load dequantized to float; recent transformers releases (5.23 does, 5.9 does
    not) also flag them as quantized, which makes `save_pretrained` refuse: rebuild the model from a
    clean config with the same tensors."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    with init_empty_weights():
        clean = type(model)(config)
    clean.load_state_dict(model.state_dict(), assign=True)
    clean.tie_weights()
    clean.generation_config = model.generation_config
    return clean.eval()


def _criterion(config: PruningConfig, kind: str) -> Criterion:
    criterion = get_criterion(config.criterion_for(kind), seed=config.seed)
    if kind not in criterion.kinds:
        able = [name for name in available_criteria() if kind in get_criterion(name).kinds]
        raise InvalidPruningTargetError(
            f"criterion {criterion.name!r} cannot rank {kind}; for {kind} use one of {', '.join(able)} "
            f"(e.g. criterion={{'{kind}': '{able[0]}', ...}})."
        )
    return criterion


#: What ranks neurons inside routed experts: criteria that read only the group's own weights (the statistics of
#: one consuming projection, which the data criteria read, do not exist for a layer's many experts yet).
EXPERT_NEURON_CRITERIA = ("magnitude", "random")


def _check_neurons_in_experts(model, adapter: ArchitectureAdapter, targets, criteria: dict) -> None:
    moe = [i for i, layer in enumerate(adapter.layers(model)) if adapter.experts_of(layer)]
    neurons = criteria.get("neurons")
    if (
        neurons is None
        or neurons.name in EXPERT_NEURON_CRITERIA
        or not any(targets.counts.neurons.get(i) for i in moe)
    ):
        return
    raise InvalidPruningTargetError(
        f"criterion {neurons.name!r} cannot rank the neurons inside routed experts yet (it reads one consuming "
        "projection's calibration statistics; a mixture-of-experts layer has one per expert, issue 16); use "
        f"criterion={{'neurons': 'magnitude', ...}} (or {', '.join(repr(c) for c in EXPERT_NEURON_CRITERIA[1:])})."
    )


def load_preprocessor(name_or_path: str | os.PathLike, shared: dict) -> tuple:
    """(tokenizer, image processor) saved beside a model; either or both may be None.

    The image processor is loaded only where its `preprocessor_config.json` exists: without one,
    some transformers releases (5.9 to 5.17) try a default processor that needs torchvision and raise
    ImportError instead of saying the file is missing."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path, **shared), None
    except (OSError, ValueError, KeyError):
        found = cached_file(
            name_or_path,
            PROCESSOR_CONFIG,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **_file_kwargs(shared),
        )
        if found is not None:
            return None, transformers.AutoImageProcessor.from_pretrained(name_or_path, **shared)
        logger.info("No tokenizer or image processor found at %s; saving weights and config only.", name_or_path)
    return None, None


class HFPruner:
    """Structural pruning of one transformers model.

    ```python
    pruner = HFPruner.from_pretrained(path)
    report = pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=4)
    pruner.save_pretrained("pruned")
    ```
    """

    def __init__(self, model: PreTrainedModel, tokenizer=None, processor=None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.adapter = get_adapter(model.config)
        self.report: PruningReport | None = None
        self.plan: PruningPlan | None = None
        self.card_facts = CardFacts(parameter_count(model), flops_per_token(model))
        self.last_save: tuple[Path, PruningReport] | None = None  # (folder, the report it holds)

    #: What `from_pretrained(low_memory=True)` builds: the subclass declared with `reads_shards=True`
    #: (`hf_prune.engine.low_memory.LowMemoryPruner`, imported with the package), so this module needs no
    #: import of it.
    shard_reader: ClassVar[type[HFPruner] | None] = None

    def __init_subclass__(cls, reads_shards: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        if reads_shards:
            HFPruner.shard_reader = cls

    @classmethod
    def from_model(cls, model, example_inputs=None, tokenizer=None, processor=None):
        """Prune a model already in memory: an `HFPruner` when its config has an adapter (hand-written,
        or derived from a tiny instance of its config class and verified there), else a `TracedPruner`
        whose channel groups are traced from one forward pass on `example_inputs` (a tensor, a tuple of
        positional inputs or a dict of keyword inputs)."""
        config = getattr(model, "config", None)
        refusal = f"{type(model).__name__} has no transformers config"
        if isinstance(config, transformers.PretrainedConfig):
            try:
                return cls(model, tokenizer=tokenizer, processor=processor)
            except UnsupportedArchitectureError as error:  # no adapter, and none could be derived
                refusal = str(error)
        if example_inputs is None:
            raise InvalidPruningTargetError(
                f"{refusal}. Pass example_inputs=... (one input batch) so its channel groups can be traced from "
                "the computation graph."
            )
        from .tracing.pruner import TracedPruner

        return TracedPruner(model, example_inputs)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, low_memory: bool = False, **from_pretrained_kwargs
    ) -> HFPruner:
        """Load a model (and its tokenizer or image processor) as `from_pretrained` would.

        The architecture is checked from the config first, so an unsupported model fails before
        its weights are read. `gguf_file=...` works: the weights are dequantized to float.
        `low_memory=True` reads no weights yet and prunes layer by layer from the safetensors
        shards of a local folder (`hf_prune.engine.low_memory.LowMemoryPruner`; it also takes
        `device=` and `dtype=`).
        """
        if low_memory:
            return HFPruner.shard_reader.from_checkpoint(name_or_path, **from_pretrained_kwargs)
        shared = {key: from_pretrained_kwargs[key] for key in _SHARED_KWARGS if key in from_pretrained_kwargs}
        config = AutoConfig.from_pretrained(name_or_path, **shared)
        get_adapter(config)
        from_gguf = "gguf_file" in from_pretrained_kwargs
        model = model_class_for(config, from_gguf).from_pretrained(name_or_path, **from_pretrained_kwargs)
        if from_gguf:
            model = _without_gguf_marker(model)
        tokenizer, processor = load_preprocessor(name_or_path, shared)
        pruner = cls(model.eval(), tokenizer=tokenizer, processor=processor)
        pruner.card_facts.record_source(name_or_path)
        if from_gguf:
            gguf_path = cached_file(name_or_path, from_pretrained_kwargs["gguf_file"], **_file_kwargs(shared))
            pruner.card_facts.record_gguf_source(gguf_path)
        return pruner

    def prune(
        self, config: PruningConfig | None = None, *, statistics: CalibrationStatistics | None = None, **kwargs
    ) -> PruningReport:
        """Score, plan, repair and cut. Pass a `PruningConfig`, or its fields as keywords.

        Targets are validated before any calibration runs, the output format is decided on a
        shape-only copy, and the weights and then the statistics are checked for NaN and Inf
        (`NonFiniteError`) before any score or solve, so a refused prune leaves the model untouched.
        `statistics` reuses one calibration pass (`hf_prune.calibration.statistics.collect_statistics` on this
        same dense model) across several prunes, as the benchmarks do.
        """
        config, plan, calibration = self.plan_and_repair(config, statistics=statistics, **kwargs)
        return self.apply(plan, config, calibration=calibration)

    def plan_and_repair(
        self, config: PruningConfig | None = None, *, statistics: CalibrationStatistics | None = None, **kwargs
    ) -> tuple[PruningConfig, PruningPlan, dict | None]:
        """`prune` without the cut: score, plan and repair in place (the repairs write into the kept weights,
        the layer-by-layer modes leave the pruned layers masked). Returns the config, the plan and the
        calibration summary; `apply(plan, config, calibration)` then cuts what masking the model with the plan
        (`hf_prune.masking.apply_masks`) computes. The `PruningCallback`'s one-shot schedule at step 0 masks
        here and trains before it cuts."""
        config, targets, criteria = self.validated(config, kwargs)
        # Shapes depend on the counts (uniform) or mostly so: a random ranking tells the format before any work.
        self._check_format(plan_for(self.model, self.adapter, config, RandomCriterion()), config)
        check_finite_weights(self.model.named_parameters())

        if config.propagate != "unpruned":
            return config, *self._prune_layer_by_layer(config, targets, criteria, statistics)
        context = ScoringContext(self.model, self.adapter, batch_size=config.batch_size, damping=config.damping)
        requirements = statistics_requirements(criteria, config, targets)
        if (requirements and statistics is None) or any(c.needs_windows for c in criteria.values()):
            context.windows = self._calibration_windows(config)
        if statistics is not None and requirements - statistics.requirements:
            raise InvalidPruningTargetError(
                f"the statistics passed in lack {sorted(requirements - statistics.requirements)}, which the "
                "criteria or the repair need; collect them with those requirements."
            )
        if statistics is not None:
            context.statistics = statistics
        elif requirements:
            context.statistics = collect_statistics(
                self.model, self.adapter, context.windows.split(config.batch_size), requirements
            )
        # Under torchrun every process holds the same summed statistics; the main one plans, all cut alike
        # (`ispasp` re-selects from those same statistics, so every process re-selects alike too).
        plan = from_main_process(build_plan(context, criteria, targets) if is_main_process() else None)
        targets_of_removed = None
        if config.reconstruct in FOLDING_REPAIRS:
            runs = removed_runs(self.model, self.adapter, plan)
            if runs:
                if context.windows is None:
                    context.windows = self._calibration_windows(config)
                targets_of_removed = removed_layer_targets(
                    self.model, self.adapter, context.windows.split(config.batch_size), runs
                )
        plan = reconstruct(
            self.model,
            self.adapter,
            plan,
            context.statistics,
            config.reconstruct,
            targets_of_removed,
            damping=config.damping,
        )
        if config.expert_repair == "merge":
            merge_removed_experts(self.model, self.adapter, plan, context.statistics)
        calibration = None
        if context.statistics is not None:
            windows = len(context.windows) if context.windows is not None else config.num_samples
            calibration = calibration_summary(config, windows, context.statistics.tokens)
        return config, plan, calibration

    def _calibration_windows(self, config: PruningConfig):
        """The config's calibration windows (token ids, or pixel batches for image models)."""
        return token_windows(
            config.calibration, self.tokenizer, config.num_samples, config.seq_len, config.seed, self.processor
        )

    def _prune_layer_by_layer(
        self, config: PruningConfig, targets: RemovalCounts, criteria: dict[str, Criterion], statistics
    ) -> tuple[PruningPlan, dict]:
        """`propagate="pruned"` or `"both"`: each layer measured on the pruned model's activations (`layerwise`);
        returns the plan (the model masked in place) and the calibration summary."""
        if statistics is not None:
            raise InvalidPruningTargetError(
                f"statistics=... holds the dense model's one-pass measurements, which propagate={config.propagate!r} "
                "does not use (each layer is measured on the pruned layers' outputs); drop statistics= or use "
                "propagate='unpruned'."
            )
        if config.allocation != "uniform":
            raise InvalidPruningTargetError(
                f"propagate={config.propagate!r} plans one layer at a time, so allocation={config.allocation!r} "
                "(which "
                "ranks every layer's groups together) cannot follow it; use allocation='uniform' or "
                "propagate='unpruned'."
            )
        check_layer_local(criteria, f"propagate={config.propagate!r}", "propagate='unpruned'")
        check_untied_heads(self.adapter, targets, f"propagate={config.propagate!r}", "use propagate='unpruned'")
        windows = self._calibration_windows(config)
        # Every process plans alike: each layer's statistics are summed across processes first.
        plan = prune_layer_by_layer(
            self.model, self.adapter, config, criteria, targets, windows, toward_dense=config.propagate == "both"
        )
        return plan, calibration_summary(config, len(windows), batch_tokens([windows]))

    def write_companions(self, folder: Path, decision: FormatDecision, model_id: str) -> None:
        """Everything a saved folder holds beside its weights and config: the loader-format files when
        needed, tokenizer or processor, and the model card."""
        if not decision.vanilla:
            write_loader_config(folder, self.model, self.adapter)
        for extra in (self.tokenizer, self.processor):
            if extra is not None:
                extra.save_pretrained(folder)
        write_model_card(folder, CardInputs.of(self.model, self.report, self.card_facts, model_id))

    def validated(
        self, config: PruningConfig | None, kwargs: dict
    ) -> tuple[PruningConfig, RemovalCounts, dict[str, Criterion]]:
        """The config, its per-kind counts and criteria, checked against the model's shapes before any work."""
        if config is not None and kwargs:
            raise TypeError("pass either a PruningConfig or keyword arguments, not both")
        config = config or PruningConfig(**kwargs)
        if config.is_empty:
            raise InvalidPruningTargetError(
                f"nothing to remove: set at least one of {', '.join(PruningConfig.AMOUNTS + BUDGET_TARGETS)} "
                "(e.g. mlp_neurons=0.25 or sparsity=0.2)."
            )
        targets = resolve_counts(self.model, self.adapter, config)
        criteria = {kind: _criterion(config, kind) for kind in sorted(targets.kinds())}
        _check_neurons_in_experts(self.model, self.adapter, targets, criteria)
        return config, targets, criteria

    def apply(self, plan: PruningPlan, config: PruningConfig, calibration: dict | None = None) -> PruningReport:
        """Cut a plan made elsewhere (`PruningCallback`'s training-time masks) exactly as `prune`
        cuts its own: format check first, surgery, config fields, report; then `save_pretrained` works."""
        return self._apply(plan, config, calibration)

    def _apply(
        self,
        plan: PruningPlan,
        config: PruningConfig,
        calibration: dict | None,
        dense: nn.Module | None = None,
        cut: Callable[[nn.Module, ArchitectureAdapter, PruningPlan], None] = apply_plan,
    ) -> PruningReport:
        """`apply`, for every driver: `dense` holds the shapes before any cut (default: the model) and
        `cut` makes the model smaller (the low-memory prune has cut each layer already; it drops the
        removed ones). The parameter count is checked against the plan's (`engine.core.cut_checked`)."""
        decision = self._check_format(plan, config, dense)
        before, after = cut_checked(self.model, self.adapter, plan, decision, dense, cut)
        self.plan = plan
        self.report = PruningReport.build(
            self.model.config.model_type,
            plan,
            before,
            after,
            decision.name,
            decision.reason,
            config.to_dict(),
            calibration,
        )
        return self.report

    def _check_format(
        self, plan: PruningPlan, config: PruningConfig, dense: nn.Module | None = None
    ) -> FormatDecision:
        """Decide the output format on a meta-device copy (of `dense`, the shapes before any cut; default:
        the model); refuse under `require_vanilla` before any change."""
        shadow = meta_copy(self.model if dense is None else dense)
        apply_plan(shadow, self.adapter, plan)
        decision = decide_format(shadow, self.adapter)
        if config.require_vanilla and not decision.vanilla:
            raise VanillaFormatError(
                f"require_vanilla=True, but the pruned model needs the loader format: {decision.reason}. "
                "Prune the same number of heads and neurons in every layer, prune only what the family's config "
                "can express, or drop require_vanilla to write the loader format (hf_prune.load_pruned)."
            )
        return decision

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write config, safetensors weights, tokenizer or processor, generation config, and the
        model card (README.md, its plot and the recipe).

        The folder appears complete or not at all; an existing non-empty folder is refused
        unless `overwrite=True`. Under torchrun only the main process writes; the others return the
        path at once (no collective here, so guarding the call with `is_main_process` works too).
        """
        if not is_main_process():
            return Path(save_directory)
        if self.report is None:
            raise NotPrunedError("call prune() before save_pretrained(); nothing has been pruned yet.")
        decision = decide_format(self.model, self.adapter)

        def write(folder: Path) -> None:
            self.model.save_pretrained(folder)
            self.write_companions(folder, decision, model_id=Path(save_directory).name)

        folder = write_atomically(save_directory, write, overwrite=overwrite)
        self.last_save = (folder, self.report)
        return folder

    def push_to_hub(
        self,
        repo_id: str,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
        api: HfApi | None = None,
    ) -> str | None:
        """Upload the folder `save_pretrained` wrote, in one commit (saved to a temporary folder
        first when this prune was never saved); see `hf_prune.output.hub.push_folder`. Under torchrun only
        the main process uploads and returns the commit URL; the others return `None`."""
        if not is_main_process():
            return None
        last = self.last_save  # (folder, the report it holds): pushed as is while it holds this prune
        saved = last[0] if last is not None and last[1] is self.report and last[0].is_dir() else None
        push = dict(private=private, token=token, commit_message=commit_message, api=api)
        return push_saved(repo_id, saved, self.save_pretrained, **push)
