"""`PruningCallback`: gradual structured pruning while a `transformers.Trainer` fine-tunes.

During training nothing is swapped under the live optimizer: groups are *masked* with the
engine's semantics (`masking.py`), and the masks are re-applied after every optimizer step so
masked weights stay exactly zero. At the schedule's events the masks grow toward the
`PruningConfig` amounts (`gradual.py`), ranked by scores the training batches already produce
(`scores.py`). At the end the masked model is cut physically (`surgery.py`, through
`HFPruner.apply`) and saved as a standard checkpoint.

```python
callback = PruningCallback(PruningConfig(mlp_neurons=0.5))          # cubic, step 0 → 75% of the run
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
trainer.train()            # trainer.model is the pruned model; saved to output_dir/pruned
```

On mixture-of-experts models `PruningConfig(experts=...)` masks routed experts the way the engine's masking
reference does (a router hook: a masked expert's logit is −∞ before the top-k, so it is never selected and the
kept experts' weights renormalise as the cut model's do), ranked by the same training scores taken at the gate
weights the router hands the experts (`scores.py`), or by `score="criterion"` with a data-free criterion, or by
the one-shot engine (`PruningSchedule("oneshot")`, REAP by default); at the end the experts are cut.

With `score="l0"` the ranking comes from hard-concrete gates learned with the task loss
(`l0_gates.py`); attach them before the Trainer builds its optimizer:

```python
callback = PruningCallback(PruningConfig(mlp_neurons=0.5), score="l0")
callback.attach_gates(model)                                          # before Trainer(...)
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
```

With `distill=True` (or `distill=Distillation(alpha=..., temperature=..., teacher=...)`) the training
loss becomes `α·T²·KL(teacher ‖ student) + (1 − α)·task loss`, the teacher being the unpruned model
frozen at the start of training (`distillation.py`); evaluation still reports the task loss alone.

With `schedule=PruningSchedule("oneshot")` (at step 0) the whole zero-shot prune runs before the first
step, with the one-shot engine itself (`HFPruner.plan_and_repair`: calibration, `config.criterion`,
`config.reconstruct`), calibrated on the first `config.num_samples` training examples (or `calibration=`);
its plan is masked, training recovers (with `distill=` from the dense model), and the end cuts, so
"prune, then recover" is one `trainer.train()`:

```python
callback = PruningCallback(PruningConfig(mlp_neurons=0.5), PruningSchedule("oneshot"), distill=True)
```

With `repair="lstsq"` every pruning event refits the consumers of the newly masked heads and neurons by
least squares (the one-shot prune's `lstsq`) from Gram statistics of the training batches since the last
event (`event_repair.py`, which states the memory: one float64 width² Gram per consumer).

Every Trainer checkpoint gets a `hf_prune_callback/` folder (plan as JSON, score accumulators
as safetensors, the step); `trainer.train(resume_from_checkpoint=...)` restores it, so a resumed
run masks exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..calibration.distributed import is_main_process
from ..config import PruningConfig
from ..criteria import ScoringContext, get_criterion
from ..errors import (
    CallbackStateError,
    GatesNotAttachedError,
    InvalidPruningTargetError,
    InvalidScheduleError,
    NotPrunedError,
    UsageError,
)
from ..groups import ArchitectureAdapter, GroupKind, get_adapter
from ..kinds import AMOUNT_OF_KIND, BLOCK_KINDS, BUDGET_TARGETS, EXPERT_KINDS, GROUP_KINDS
from ..output.atomic import write_atomically
from ..output.card import CardFacts, TrainingFacts
from ..plan import LayerPlan, PruningPlan
from ..pruner import HFPruner
from ..report import PruningReport
from .distillation import Distillation, Distiller, is_peft
from .event_repair import EventRepair
from .gradual import GradualPlanner, ScoreFunction
from .l0_gates import HardConcreteGates, L0Settings, LagrangianPenalty, attach_gates, detach_gates, find_gates
from .masks import TrainingMasks
from .schedule import PruningSchedule
from .scores import TRAINING_SCORES, TrainingScores

logger = logging.getLogger(__name__)

STATE_FOLDER = "hf_prune_callback"
STATE_VERSION = 1
#: `repair=` at pruning events: none, or the one-shot prune's least-squares refit (`event_repair.py`).
REPAIRS = ("none", "lstsq")
#: `criterion` ranks with `config.criterion` (the registry's data-free criteria) on the current weights;
#: `l0` by the log-alpha of hard-concrete gates learned with the task loss.
SCORES = (*TRAINING_SCORES, "criterion", "l0")
#: What each score measures, for the model card (`criterion` adds the criterion's name).
SCORE_DESCRIPTIONS = {
    "taylor": "first-order Taylor importance Σ|Σ z·∂L/∂z| over the training batches, Molchanov et al. 2019",
    "movement": "movement −Σ g·w over the training batches, Sanh et al. 2020",
    "activation": "activation norm ‖z‖₂ over the training tokens",
    "criterion": "the `{criterion}` criterion on the weights as they train",
    "l0": "hard-concrete L0 gates learned with the task loss, Louizos et al. 2018",
    "oneshot": "the one-shot prune before the first step: criterion `{criterion}`, repair `{reconstruct}`",
}


def _kinds(counts: dict[str, int]) -> list[GroupKind]:
    """The group kinds `build_plan` scores for the final per-kind counts (amount names)."""
    removed = {kind for kind, amount in AMOUNT_OF_KIND.items() if counts.get(amount)}
    if removed & {"kv_groups", "heads"}:  # the heads inside kept groups are ranked with the groups
        removed |= {"kv_groups", "heads"}
    return [kind for kind in AMOUNT_OF_KIND if kind in removed]


def _gate_targets(counts: dict[str, int], model: nn.Module, adapter: ArchitectureAdapter) -> dict[GroupKind, float]:
    """The final kept fraction of query heads and MLP neurons the counts leave (uniform layers)."""
    unsupported = [kind for kind in GROUP_KINDS if kind in BLOCK_KINDS | EXPERT_KINDS and counts.get(kind)]
    if unsupported:
        raise InvalidPruningTargetError(
            f"score='l0' gates heads and MLP neurons only, but the config also removes {', '.join(unsupported)}; "
            "drop those amounts, or use another score (e.g. score='taylor')."
        )
    geometry = adapter.geometry(adapter.layers(model)[0])
    targets: dict[GroupKind, float] = {}
    attention = geometry.attention
    if attention is not None and (counts["kv_groups"] or counts["attention_heads"]):
        if attention.heads_per_group == 1:
            kept = attention.num_heads - counts["attention_heads"]
        else:
            kept = (attention.num_kv_heads - counts["kv_groups"]) * (
                attention.heads_per_group - counts["attention_heads"]
            )
        targets["heads"] = kept / attention.num_heads
    if geometry.intermediate_size and counts["mlp_neurons"]:
        targets["neurons"] = 1 - counts["mlp_neurons"] / geometry.intermediate_size
    return targets


def _check_neurons_in_experts(
    counts: dict[str, int], model: nn.Module, adapter: ArchitectureAdapter, score: str, repair: str
) -> None:
    """Neurons inside routed experts have one consuming projection per expert (the fused down projection), which
    the training scores, the gates and the least-squares refit all read as one module: refuse those for them."""
    if not counts["mlp_neurons"] or not any(adapter.experts_of(layer) for layer in adapter.layers(model)):
        return
    if score in (*TRAINING_SCORES, "l0"):
        raise InvalidPruningTargetError(
            f"mlp_neurons={counts['mlp_neurons']} inside routed experts: score={score!r} reads one consuming "
            "projection per layer, and a mixture-of-experts layer has one per expert; use score='criterion' with "
            "criterion={'neurons': 'magnitude', ...} (experts keep any score), or remove experts only."
        )
    if repair != "none":
        raise InvalidPruningTargetError(
            f"mlp_neurons={counts['mlp_neurons']} inside routed experts: repair={repair!r} refits one consuming "
            "projection per layer, and a mixture-of-experts layer has one per expert; use repair='none'."
        )


def _is_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id (then it becomes the card's `base_model`), not a local path."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _json(data: dict) -> dict:
    """`data` as it reads back from JSON (tuples become lists), for comparisons with saved state."""
    return json.loads(json.dumps(data))


class PruningCallback(TrainerCallback):
    """Masks groups gradually during training and compacts the model at the end.

    Args:
        config: the final targets (every `PruningConfig` amount) and, for `score="criterion"`, the criterion.
        schedule: when to mask more; default cubic from step 0 to 75% of the run's optimizer steps.
        score: `taylor`, `movement`, `activation` (from the training batches, see `training_scores`),
            `criterion` (`config.criterion` on the current weights) or `l0` (hard-concrete gates learned
            with the task loss, see `l0_gates`; call `attach_gates(model)` before `Trainer(...)`).
        l0: the gates' and penalty's hyperparameters for `score="l0"` (default `L0Settings()`).
        compact_at_end: cut the masked model physically in `on_train_end` (`trainer.model` is then the
            pruned model; under PEFT the `PeftModel` shell around the merged, pruned model).
        pruned_dir: folder under `args.output_dir` the compacted model is saved to (replaced if it
            exists); `None` saves nothing.
        distill: `None` (default) trains on the task loss alone; `True` or `Distillation(alpha, temperature,
            teacher)` adds the distillation term from the unpruned model (see `distillation.py`): a frozen copy
            taken at the start of training, for a PEFT student its base with the adapters disabled (no copy),
            or the `teacher` given (same vocabulary).
        calibration: for the one-shot schedule at step 0, the calibration source of the zero-shot prune (what
            `PruningConfig.calibration` takes); `None`: the first `config.num_samples` training examples,
            collated by the Trainer's collator (pack them into full windows: padding would be counted).
        repair: `"none"` (default) or `"lstsq"`: at every event, refit the consumers (`o_proj`, `down_proj`)
            of the newly masked heads, KV groups and neurons by least squares from the Gram matrices of their
            inputs over the training batches since the last event (`event_repair.py`; one float64
            `width²` Gram per consumer, e.g. 566 MB for SmolLM2-135M's MLPs).
    """

    def __init__(
        self,
        config: PruningConfig,
        schedule: PruningSchedule | None = None,
        score: str = "taylor",
        compact_at_end: bool = True,
        pruned_dir: str | None = "pruned",
        l0: L0Settings | None = None,
        distill: bool | Distillation | None = None,
        repair: str = "none",
        calibration=None,
    ):
        if not isinstance(config, PruningConfig):
            raise UsageError(f"config must be a PruningConfig, got {type(config).__name__}.")
        if config.is_empty:
            raise InvalidPruningTargetError(
                f"nothing to remove: set at least one of {', '.join(PruningConfig.AMOUNTS + BUDGET_TARGETS)} "
                "(e.g. mlp_neurons=0.5)."
            )
        if config.allocation != "uniform" or config.protected_layers:
            raise InvalidPruningTargetError(
                "gradual pruning keeps every layer the same shape: use allocation='uniform' without protected_layers "
                "in the callback, or prune in one shot with HFPruner.prune."
            )
        for name in ("channels", "stage_channels"):
            if getattr(config, name):
                raise InvalidPruningTargetError(
                    f"{name}={getattr(config, name)!r}: the PruningCallback prunes heads, KV groups, neurons, "
                    "routed experts, branches "
                    f"and layers; channel pruning is one-shot (HFPruner.from_model(...).prune({name}=...))."
                )
        if schedule is not None and not isinstance(schedule, PruningSchedule):
            raise UsageError(f"schedule must be a PruningSchedule or None, got {type(schedule).__name__}.")
        if score not in SCORES:
            raise UsageError(f"score={score!r} is unknown; choose one of {', '.join(SCORES)}.")
        if l0 is not None and score != "l0":
            raise UsageError(
                f"l0=L0Settings(...) configures score='l0', but score={score!r}; drop l0 or set score='l0'."
            )
        if repair not in REPAIRS:
            raise UsageError(f"repair={repair!r} is unknown; choose one of {', '.join(map(repr, REPAIRS))}.")
        if repair != "none" and score == "l0":
            raise UsageError(
                "repair='lstsq' refits consumers from their ungated inputs, but score='l0' gates those inputs while "
                "training; use repair='none' with score='l0', or another score (e.g. score='taylor')."
            )
        self.repair = repair
        self.calibration = calibration
        if score == "l0" and schedule is not None and schedule.kind == "oneshot" and schedule.start_step == 0:
            raise UsageError(
                "the one-shot schedule at step 0 ranks with config.criterion before training, so score='l0' has no "
                "gates to learn; drop score='l0', or start the schedule later (PruningSchedule('oneshot', "
                "start_step=N))."
            )
        self.distill = Distillation.coerce(distill)
        self.config = config
        self.schedule = schedule
        self.l0 = l0 or L0Settings()
        #: For `score="l0"`: the Lagrange multipliers pulling the gates toward the targets.
        self.penalty: LagrangianPenalty | None = None
        self.score = score
        self.compact_at_end = compact_at_end
        self.pruned_dir = pruned_dir
        #: The masks in force (original indices); after training, what was cut.
        self.plan: PruningPlan | None = None
        #: Set by compaction: the physically pruned model and its report.
        self.pruned_model: PreTrainedModel | None = None
        self.report: PruningReport | None = None
        self._adapter: ArchitectureAdapter | None = None
        self._resolved: PruningSchedule | None = None
        self._events: frozenset[int] = frozenset()
        self._planner: GradualPlanner | None = None
        self._scores: TrainingScores | None = None
        self._criterion_score: ScoreFunction | None = None
        self._masks: TrainingMasks | None = None
        self._gates: HardConcreteGates | None = None
        self._loss_hook = None
        self._distiller: Distiller | None = None
        self._repair: EventRepair | None = None
        #: The one-shot prune's calibration summary (the schedule at step 0), for the report.
        self._calibration_summary: dict | None = None
        #: The run the masks came from, for the model card (set by the Trainer events).
        self._args: TrainingArguments | None = None
        self._state: TrainerState | None = None

    # ------------------------------------------------------------------ L0 gates
    def attach_gates(self, model: nn.Module) -> HardConcreteGates:
        """Register the hard-concrete gates (`score="l0"`) on `model`, before `Trainer(...)` builds the optimizer.

        Gates cover query heads when the config removes heads or KV groups, MLP neurons when it
        removes neurons; their parameters live in the model's state (Trainer checkpoints keep them;
        attach again on the fresh model of a resumed run) and are removed at compaction.
        """
        if self.score != "l0":
            raise UsageError(f"attach_gates() is for score='l0'; this callback has score={self.score!r}.")
        adapter = get_adapter(model.config)
        counts = GradualPlanner(model, adapter, self.config).counts
        targets = _gate_targets(counts, model, adapter)
        _check_neurons_in_experts(counts, model, adapter, self.score, self.repair)
        return attach_gates(model, adapter, tuple(targets), self.l0)

    def _start_gates(self, args: TrainingArguments, model: nn.Module, optimizer) -> None:
        """Find the attached gates, check the optimizer trains them, add the penalty to the training loss."""
        gates = find_gates(model)
        if gates is None:
            raise GatesNotAttachedError(
                "score='l0' needs hard-concrete gates on the model before the Trainer builds its optimizer: call "
                "callback.attach_gates(model) before Trainer(model=model, ...)."
            )
        if optimizer is not None:
            optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
            if any(id(p) not in optimized for p in gates.parameters()):
                raise GatesNotAttachedError(
                    "the hard-concrete gates are not in the Trainer's optimizer (they were attached after it was "
                    "built): call callback.attach_gates(model) before Trainer(model=model, ...)."
                )
        self._gates = gates
        targets = _gate_targets(self._planner.counts, model, self._adapter)
        self.penalty = LagrangianPenalty(targets, self.l0.multiplier_lr)
        accumulation = args.gradient_accumulation_steps

        def add_penalty(module: nn.Module, inputs, output):
            # Every training forward's loss carries the penalty, divided over the micro-batches of a step.
            if module.training and torch.is_grad_enabled() and getattr(output, "loss", None) is not None:
                output["loss"] = output["loss"] + self.penalty.penalty(gates.expected_kept()) / accumulation
            return output

        self._loss_hook = model.register_forward_hook(add_penalty)

    def _start_distillation(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        if state.global_step > 0 and self.distill.teacher is None and not is_peft(model):
            raise CallbackStateError(
                f"distill has no teacher on a resumed run: at step {state.global_step} the model holds the "
                "checkpoint's masked weights, not the unpruned ones; pass the dense model as "
                "Distillation(teacher=...) when resuming."
            )
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self._distiller = Distiller(self.distill, model, autocast, restore_masked=lambda: self._masks.unmasked())

    @property
    def _oneshot_at_start(self) -> bool:
        return self._resolved is not None and self._resolved.kind == "oneshot" and self._resolved.start_step == 0

    def _prune_once(self, model: nn.Module, dataloader, processing_class) -> None:
        """The one-shot schedule at step 0: the zero-shot engine's plan and repair, in place, without the cut."""
        calibration = self.calibration if self.calibration is not None else self._training_windows(dataloader)
        tokenizer = processing_class if isinstance(processing_class, PreTrainedTokenizerBase) else None
        processor = processing_class if tokenizer is None else None
        pruner = HFPruner(model, tokenizer, processor)
        _, self.plan, self._calibration_summary = pruner.plan_and_repair(replace(self.config, calibration=calibration))
        logger.info(
            "step 0: pruned in one shot (criterion %s, repair %s)", self.config.criterion, self.config.reconstruct
        )

    def _training_windows(self, dataloader) -> list[torch.Tensor]:
        """The first `num_samples` training examples as one collated batch of token ids (or pixels)."""
        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise UsageError(
                "the one-shot schedule at step 0 calibrates on the first training examples, but the training "
                f"dataset ({type(dataset).__name__}) cannot be indexed; pass PruningCallback(calibration=...) "
                "(what PruningConfig.calibration takes, e.g. a list of token-id tensors)."
            )
        items = [dataset[index] for index in range(min(self.config.num_samples, len(dataset)))]
        batch = dataloader.collate_fn(items)
        key = next((name for name in ("input_ids", "pixel_values") if name in batch), None)
        if key is None:
            raise UsageError(
                f"the training batches hold {sorted(batch)}, neither input_ids nor pixel_values; pass "
                "PruningCallback(calibration=...) for the one-shot schedule at step 0."
            )
        mask = batch.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            logger.warning(
                "the one-shot calibration batch is padded (%d of %d tokens): padding is measured like text; pack "
                "the training data into full windows, or pass PruningCallback(calibration=...).",
                int((mask == 0).sum()),
                mask.numel(),
            )
        return [batch[key]]

    def _start_repair(self, model: nn.Module, state: TrainerState) -> None:
        if is_peft(model):
            raise UsageError(
                f"repair={self.repair!r} refits base weights, which a PEFT model's adapters sit on top of; train the "
                "full model with repair, or use repair='none' with LoRA."
            )
        if state.global_step >= self._resolved.end_step:
            return  # no event left to repair at
        kinds = set(_kinds(self._planner.counts))
        branches = tuple(
            branch
            for branch, removes in (("attention", kinds & {"heads", "kv_groups"}), ("mlp", kinds & {"neurons"}))
            if removes
        )
        if branches:
            self._repair = EventRepair(model, self._adapter, branches, self.config.damping)

    # ------------------------------------------------------------------ Trainer events
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        self._release_hooks()  # of an earlier train() call
        self._args, self._state = args, state
        if self.score != "criterion" and args.gradient_checkpointing:
            raise UsageError(
                f"score={self.score!r} reads activations (or samples gates) in forward hooks, which "
                "gradient_checkpointing=True runs twice; set TrainingArguments(gradient_checkpointing=False) "
                "or use score='criterion'."
            )
        self._adapter = get_adapter(model.config)
        self._resolved = (self.schedule or PruningSchedule()).resolved(state.max_steps)
        self._events = frozenset(self._resolved.events())
        self._planner = GradualPlanner(model, self._adapter, self.config)
        oneshot = self._oneshot_at_start
        if not oneshot:  # the one-shot engine ranks and repairs neurons inside experts itself (or refuses)
            _check_neurons_in_experts(self._planner.counts, model, self._adapter, self.score, self.repair)
        if oneshot and is_peft(model):
            raise UsageError(
                "the one-shot schedule at step 0 prunes and repairs the base weights under a PEFT model's adapters; "
                "prune first (HFPruner(...).prune, save_pretrained) and recover with lora_for_recovery, or train "
                "the full model."
            )
        if self.distill is not None:  # before any hook or mask: a teacher copy is taken of the unmasked model
            self._start_distillation(args, state, model)
        if oneshot:
            self._criterion_score = None  # the engine ranks, once, before training
        elif self.score in TRAINING_SCORES:
            self._scores = TrainingScores(model, self._adapter, _kinds(self._planner.counts), self.score)
        elif self.score == "l0":
            self._start_gates(args, model, kwargs.get("optimizer"))
            self._criterion_score = self._gates.score
        else:
            self._criterion_score = self._registry_score
        if self.repair != "none":
            self._start_repair(model, state)
        self.plan = PruningPlan.keep_all(model, self._adapter)
        if state.global_step > 0:
            self._restore(args, state, model)
        elif oneshot:
            self._prune_once(model, kwargs.get("train_dataloader"), kwargs.get("processing_class"))
        elif self._resolved.fraction(0) > 0:
            if self.score != "criterion":
                raise InvalidScheduleError(
                    f"the schedule masks {self._resolved.fraction(0):.0%} of the targets at step 0, before any "
                    f"training batch has produced {self.score!r} scores; use start_step >= 1 (or initial_sparsity=0), "
                    "or score='criterion'."
                )
            self._prune(model, 0)
        own_base = self._distiller is not None and self._distiller.shares_student
        self._masks = TrainingMasks(self._adapter, self.plan, keep_originals=own_base)
        self._masks.apply(model)
        if self._gates is not None:
            self._gates.set_removed(self.plan)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if self._scores is not None:
            self._scores.end_step()
        if self.penalty is not None:
            self.penalty.step()
        if state.global_step in self._events:
            previous = self.plan
            if self._repair is not None:
                self._masks.apply(model)  # the refit's target is the masked model: earlier masks exact first
            self._prune(model, state.global_step)
            if self._repair is not None:
                refitted = self._repair.refit(model, previous, self.plan)
                logger.info("step %d: refitted %d consumers by least squares", state.global_step, len(refitted))
                if state.global_step >= self._resolved.end_step:
                    self._repair.remove_hooks()
                    self._repair = None
        self._masks.apply(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        if self._repair is not None:  # every process, before the main one alone writes
            self._repair.gather()
        if not args.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if not folder.is_dir():
            raise CallbackStateError(f"on_save found no checkpoint folder {folder}; PruningCallback saves into it.")
        state_data = {
            "format_version": STATE_VERSION,
            "global_step": state.global_step,
            "score": self.score,
            "config": self.config.to_dict(),
            "schedule": self._resolved.to_dict(),
            "repair": self.repair,
            "plan": [layer.to_dict() for layer in self.plan.layers],
        }
        if self.penalty is not None:
            state_data["lagrangian"] = self.penalty.state_dict()

        def write(staging: Path) -> None:
            (staging / "state.json").write_text(json.dumps(state_data, indent=2) + "\n")
            if self._scores is not None:
                save_file(self._scores.state_dict(), str(staging / "scores.safetensors"))
            if self._repair is not None:
                save_file(self._repair.state_dict(), str(staging / "repair.safetensors"))

        write_atomically(folder / STATE_FOLDER, write, overwrite=True)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        processing_class=None,
        **kwargs,
    ) -> None:
        if state.global_step < self._resolved.end_step:
            logger.warning(
                "training stopped at step %d, before the schedule's end_step %d: "
                "the pruning targets were not reached.",
                state.global_step,
                self._resolved.end_step,
            )
        if self._loss_hook is not None:  # later forwards (evaluation, inference) carry no penalty
            self._loss_hook.remove()
            self._loss_hook = None
        if self._distiller is not None:  # nor distillation; the teacher copy is released
            self._distiller.remove()
            self._distiller = None
        self._args, self._state = args, state
        if not self.compact_at_end:
            return
        if args.load_best_model_at_end and state.best_model_checkpoint:
            # The Trainer has just loaded that checkpoint's weights: cut with its masks.
            self.plan = self._read_plan(Path(state.best_model_checkpoint) / STATE_FOLDER, model)
        directory = Path(args.output_dir) / self.pruned_dir if self.pruned_dir and args.should_save else None
        self.finalize(model, directory, processing_class, overwrite=True)

    # ------------------------------------------------------------------ compaction
    def finalize(
        self,
        model: nn.Module,
        save_directory: str | os.PathLike | None = None,
        tokenizer=None,
        overwrite: bool = False,
    ) -> PreTrainedModel:
        """Cut the masked model physically (in place) as the current plan says; save it if asked.

        PEFT models have their (masked) LoRA adapters merged first; the returned model is the
        plain transformers model. Its logits equal the masked model's.
        """
        if self.plan is None:
            raise NotPrunedError("PruningCallback has no masks yet: call finalize() after training has started.")
        if self.pruned_model is not None:
            raise UsageError("finalize() has already cut this model; the result is callback.pruned_model.")
        self._masks.plan = self.plan
        self._masks.apply(model)  # exact zeros, adapters included, before merging
        if self._gates is not None:  # the cut model computes what the gated model computes in eval mode
            self._gates.fold_into(model, self._adapter)
        self._release_hooks()
        detach_gates(model)
        merged = hasattr(model, "merge_and_unload")
        if merged:
            model = model.merge_and_unload()
        pruner = HFPruner(model, tokenizer)
        source = getattr(model.config, "_name_or_path", "")
        self.report = pruner.apply(self.plan, self.config, calibration=self._calibration_summary)
        self.pruned_model = pruner.model
        if save_directory is not None:
            self._card_facts(pruner.card_facts, source, merged)
            folder = pruner.save_pretrained(save_directory, overwrite=overwrite)
            logger.info("saved the pruned model to %s", folder)
        return pruner.model

    def _card_facts(self, facts: CardFacts, source: str, merged_adapters: bool) -> None:
        """What the model card adds for a prune during fine-tuning: where the model came from, the score,
        the schedule and the run (the card itself is the one template every save writes)."""
        if source and (Path(source).is_dir() or _is_repo_id(source)):
            facts.record_source(source)
        score = "oneshot" if self._oneshot_at_start else self.score
        description = SCORE_DESCRIPTIONS[score].format(
            criterion=self.config.criterion, reconstruct=self.config.reconstruct
        )
        arguments = f"score={json.dumps(self.score)}"
        if self.score == "l0" and self.l0 != L0Settings():
            arguments += f", l0={self.l0!r}"
        if self.distill is not None:
            arguments += f", {self.distill.arguments()}"
        if self.repair != "none":
            arguments += f", repair={json.dumps(self.repair)}"
        args, state = self._args, self._state
        best = state.best_model_checkpoint if args and args.load_best_model_at_end and state else None
        facts.training = TrainingFacts(
            score=score,
            score_description=description,
            schedule=self._resolved.to_dict(),
            callback_arguments=arguments,
            steps=state.global_step if state else None,
            max_steps=state.max_steps if state else None,
            epoch=state.epoch if state else None,
            learning_rate=args.learning_rate if args else None,
            batch_size=(
                args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size if args else None
            ),
            merged_adapters=merged_adapters,
            best_checkpoint=Path(best).name if best else None,
            distillation=self._distillation_description(),
        )

    def _distillation_description(self) -> str | None:
        if self.distill is None:
            return None
        distill = self.distill
        if distill.teacher is not None:
            name = getattr(getattr(distill.teacher, "config", None), "_name_or_path", "")
            teacher = f"`{name}`" if name else "a model passed by the user"
        else:
            teacher = "the unpruned model, frozen at the start of training"
        return (
            f"loss α·T²·KL(teacher ‖ student) + (1 − α)·task loss with α = {distill.alpha:g}, T = "
            f"{distill.temperature:g}; teacher: {teacher}"
        )

    # ------------------------------------------------------------------ internals
    def _registry_score(self, model: nn.Module, adapter, groups) -> torch.Tensor:
        """`config.criterion` (per kind) on the current weights; data-free criteria only, since
        training batches, not a calibration pass, are what the callback sees."""
        criterion = get_criterion(self.config.criterion_for(groups[0].kind), seed=self.config.seed)
        if criterion.requires or criterion.needs_windows:
            raise InvalidPruningTargetError(
                f"score='criterion' with criterion {criterion.name!r} needs a calibration pass; during training use "
                "score='activation', 'taylor' or 'movement' (measured on the training batches), or a data-free "
                "criterion such as 'magnitude'."
            )
        return criterion.score(ScoringContext(model, adapter), groups)

    def _prune(self, model: nn.Module, step: int) -> None:
        fraction = self._resolved.fraction(step)
        if self._scores is not None:
            self._scores.synchronize(next(model.parameters()).device)
            score = self._scores.scores
        else:
            score = self._criterion_score
        self.plan = self._planner.plan_at(model, self._adapter, fraction, score, self.plan)
        if self._masks is not None:
            self._masks.plan = self.plan
        if self._gates is not None:
            self._gates.set_removed(self.plan)
        logger.info("step %d: masking %.1f%% of the pruning targets", step, 100 * fraction)

    def _restore(self, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """Load the masks and accumulators of the checkpoint this run resumes from."""
        candidates = [Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint))
        folder = next((c / STATE_FOLDER for c in candidates if (c / STATE_FOLDER / "state.json").is_file()), None)
        if folder is None:
            raise CallbackStateError(
                f"training resumes at step {state.global_step}, but no {STATE_FOLDER}/state.json was found in "
                f"{', '.join(str(c) for c in candidates)}. If the checkpoint is elsewhere, also set "
                "TrainingArguments(resume_from_checkpoint=<that folder>); checkpoints written without "
                "PruningCallback cannot be resumed with it."
            )
        saved = json.loads((folder / "state.json").read_text())
        if saved.get("format_version") != STATE_VERSION:
            raise CallbackStateError(
                f"{folder} has state format {saved.get('format_version')}, expected {STATE_VERSION}."
            )
        current = {"global_step": state.global_step, "score": self.score, "config": self.config.to_dict()}
        current["schedule"] = self._resolved.to_dict()
        current["repair"] = self.repair
        for key, value in _json(current).items():
            found = saved.get(key, "none" if key == "repair" else None)  # written before repair existed: none
            if found != value:
                raise CallbackStateError(
                    f"the checkpoint's PruningCallback {key} is {found!r}, this run's is {value!r}; resume with "
                    "the same callback arguments (and max_steps) as the run that wrote it."
                )
        self.plan = self._read_plan(folder, model)
        if self._repair is not None:
            self._repair.drop_removed(self.plan)
            if is_main_process():  # the sums over every process (`EventRepair.gather`); the others start at 0
                self._repair.load_state_dict(
                    load_file(str(folder / "repair.safetensors")), next(model.parameters()).device
                )
        if self._scores is not None:
            self._scores.load_state_dict(load_file(str(folder / "scores.safetensors")))
        if self.penalty is not None:
            self.penalty.load_state_dict(saved["lagrangian"])
        logger.info("restored PruningCallback state from %s", folder)

    def _read_plan(self, folder: Path, model: nn.Module) -> PruningPlan:
        saved = json.loads((folder / "state.json").read_text())
        geometries = [self._adapter.geometry(layer) for layer in self._adapter.layers(model)]
        return PruningPlan([LayerPlan.from_dict(data, geometries[data["layer"]]) for data in saved["plan"]])

    def _release_hooks(self) -> None:
        if self._scores is not None:
            self._scores.remove_hooks()
        if self._masks is not None:
            self._masks.remove_hooks()
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        if self._distiller is not None:
            self._distiller.remove()
            self._distiller = None
        if self._repair is not None:
            self._repair.remove_hooks()
            self._repair = None
