"""Recovery after a one-shot prune (LLM-Pruner style): a short LoRA fine-tune on the pruned model.

```python
pruner.prune(mlp_neurons=0.5); pruner.save_pretrained("pruned")
model = lora_for_recovery("pruned")                       # PeftModel over the pruned checkpoint
Trainer(model=model, args=args, train_dataset=data).train()
model.save_pretrained("adapter")                          # adapter_config.json names "pruned" as its base
model = load_recovered("adapter")                         # base (either format) + adapter; merge=True merges
```

Distillation from the dense model (Minitron-style, see `distillation.py`) on top of either, with the
`transformers.Trainer` underneath:

```python
student = lora_for_recovery("pruned")                     # or load_pruned("pruned") for a full fine-tune
trainer = distill_for_recovery(student, dense, args, data, alpha=0.5, temperature=1.0)
```

(`DistillationCallback(dense)` adds the same loss to a Trainer you build yourself.)

The adapter's `base_model_name_or_path` is the pruned folder, never the dense model it came
from, so the adapter is only ever applied to the shapes it was trained on. Loader-format bases
need `load_pruned`, which plain `AutoPeftModel` does not call: `load_recovered` does.

Method notes and sources: docs/methods.md §6.4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from ..errors import PrunedCheckpointError, UsageError
from ..output.checkpoint import load_pruned
from .distillation import Distillation, Distiller


def lora_for_recovery(
    pruned_folder: str | os.PathLike, lora_config: LoraConfig | None = None, **from_pretrained_kwargs
) -> PeftModel:
    """Load a pruned checkpoint and add LoRA adapters (default: r=8 on every linear layer but the head)."""
    folder = str(Path(pruned_folder).resolve())
    model = load_pruned(folder, **from_pretrained_kwargs)
    config = lora_config or LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear")
    peft_model = get_peft_model(model, config)
    peft_model.peft_config["default"].base_model_name_or_path = folder
    return peft_model


def load_recovered(
    adapter_folder: str | os.PathLike, merge: bool = False, **from_pretrained_kwargs
) -> PeftModel | PreTrainedModel:
    """The pruned base named in the adapter's config, with the adapter on top (merged if `merge`)."""
    config_path = Path(adapter_folder) / "adapter_config.json"
    if not config_path.is_file():
        raise PrunedCheckpointError(
            f"{adapter_folder} has no adapter_config.json; pass the folder the adapter was saved to."
        )
    base = json.loads(config_path.read_text()).get("base_model_name_or_path")
    if not base:
        raise PrunedCheckpointError(
            f"{config_path} names no base_model_name_or_path; load the base and the adapter by hand."
        )
    model = PeftModel.from_pretrained(load_pruned(base, **from_pretrained_kwargs), str(adapter_folder))
    return model.merge_and_unload() if merge else model


class DistillationCallback(TrainerCallback):
    """Adds `α·T²·KL(teacher ‖ student at T) + (1 − α)·task loss` to every training forward of the Trainer's
    model (a pruned model, or a `PeftModel` over one); evaluation reports the task loss alone.

    Args:
        teacher: the dense model (or any model with the student's vocabulary / classes); it is frozen, put in
            eval mode and moved to the student's device. A pruned student cannot be its own teacher.
        alpha, temperature: as in `Distillation`.
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.0):
        if teacher is None:
            raise UsageError(
                "DistillationCallback(teacher=None): a pruned student needs its dense model as teacher; pass "
                "teacher=<the unpruned model> (or use PruningCallback(distill=True) to prune and distil at once)."
            )
        self.settings = Distillation(alpha=alpha, temperature=temperature, teacher=teacher)
        self._distiller: Distiller | None = None

    def on_train_begin(self, args: TrainingArguments, state, control, model: nn.Module = None, **kwargs) -> None:
        self._remove()
        autocast = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self._distiller = Distiller(self.settings, model, autocast)

    def on_train_end(self, args: TrainingArguments, state, control, **kwargs) -> None:
        self._remove()

    def _remove(self) -> None:
        if self._distiller is not None:
            self._distiller.remove()
            self._distiller = None


def distill_for_recovery(
    model: nn.Module,
    teacher: nn.Module,
    args: TrainingArguments,
    train_dataset,
    alpha: float = 0.5,
    temperature: float = 1.0,
    **trainer_kwargs,
) -> Trainer:
    """Fine-tune a pruned `model` (plain, or from `lora_for_recovery`) on `train_dataset` with distillation
    from `teacher`; returns the trained `Trainer` (`trainer.model` is the recovered model)."""
    callbacks = [*trainer_kwargs.pop("callbacks", []), DistillationCallback(teacher, alpha, temperature)]
    trainer = Trainer(model=model, args=args, train_dataset=train_dataset, callbacks=callbacks, **trainer_kwargs)
    trainer.train()
    return trainer
