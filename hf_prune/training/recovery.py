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

Without writing a script (`hf-prune recover`), `recover_folder` fine-tunes a saved pruned folder on
windows of a text source and writes the recovered model to a new folder:

```python
recover_folder("pruned", "recovered", data="wikitext2", steps=100, distill=True, teacher="HuggingFaceTB/SmolLM2-135M")
```

The adapter's `base_model_name_or_path` is the pruned folder, never the dense model it came
from, so the adapter is only ever applied to the shapes it was trained on. Loader-format bases
need `load_pruned`, which plain `AutoPeftModel` does not call: `load_recovered` does.

Method notes and sources: docs/methods.md §6.4.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel, Trainer, TrainerCallback, TrainingArguments

from ..calibration.sources import token_windows
from ..errors import DataNotFoundError, OutputExistsError, PrunedCheckpointError, UsageError
from ..output.atomic import check_output_folder, write_atomically
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


#: Learning rates of `recover_folder` when none is given: the fine-tuning benchmark's (full, LoRA).
LEARNING_RATES = {"full": 5e-5, "lora": 2e-4}
#: Files of a pruned folder that hold weights: the recovered model's own replace them.
_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _positive(name: str, value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name}={value!r} must be a positive whole number (CLI: {option}, e.g. {option} 100).")


def recover_folder(
    folder: str | os.PathLike,
    output: str | os.PathLike,
    data,
    steps: int,
    *,
    distill: bool = False,
    teacher: str | os.PathLike | nn.Module | None = None,
    lora: bool = False,
    batch_size: int = 4,
    seq_len: int = 512,
    learning_rate: float | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    seed: int = 0,
    bf16: bool = False,
) -> Path:
    """Fine-tune the pruned checkpoint in `folder` and write the recovered model to `output`, a new folder.

    The training data are `steps × batch_size` windows of `seq_len` tokens drawn (seeded) from `data`, any
    text source calibration takes (`'wikitext2'`, a text file, a folder of parquet files, a list of
    strings), tokenized with the folder's tokenizer; `steps` optimizer steps of the plain `Trainer`, linear
    decay from `learning_rate` (default `LEARNING_RATES`). With `distill`, the loss is
    `α·T²·KL(teacher ‖ student) + (1 − α)·task loss` (`distill_for_recovery`) with `teacher` the dense model
    (a folder, Hub id or model; same vocabulary); with `lora`, LoRA adapters (`lora_for_recovery`) are trained
    and merged before saving. `output` gets the folder's files (config, tokenizer, card with a "Recovery"
    section added) and the new weights, all at once (`write_atomically`); an existing non-empty `output`, or
    `folder` itself, is refused. Returns the written folder."""
    folder, output = Path(folder), Path(output)
    _positive("steps", steps, "--steps")
    _positive("batch_size", batch_size, "--batch-size")
    _positive("seq_len", seq_len, "--seq-len")
    if distill and teacher is None:
        raise UsageError(
            "distill=True needs the dense model as teacher: pass teacher=<its folder or Hub id> (CLI: --teacher)."
        )
    if teacher is not None and not distill:
        raise UsageError("teacher= is read only with distillation: add distill=True (CLI: --distill) or drop it.")
    if not (folder / "config.json").is_file():
        raise PrunedCheckpointError(
            f"{str(folder)!r} has no config.json: pass a folder hf_prune saved (hf-prune prune --output FOLDER)."
        )
    if output.resolve() == folder.resolve():
        raise OutputExistsError(
            f"output {str(output)!r} is the pruned folder itself: recovery never overwrites it; choose a new folder."
        )
    check_output_folder(output, overwrite=False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"{str(folder)!r} has no tokenizer to cut the training text with ({error}); save the pruned model with "
            "its tokenizer (HFPruner.from_pretrained keeps it)."
        ) from error
    try:
        windows = token_windows(data, tokenizer, steps * batch_size, seq_len, seed)
    except DataNotFoundError as error:
        raise DataNotFoundError(f"data={data!r} (CLI: --data): {error}") from error
    student = lora_for_recovery(folder) if lora else load_pruned(folder)
    teacher_model = _load_teacher(teacher) if distill else None
    rate = learning_rate if learning_rate is not None else LEARNING_RATES["lora" if lora else "full"]
    rows = [{"input_ids": window, "labels": window} for window in windows]
    with tempfile.TemporaryDirectory() as work:
        args = TrainingArguments(
            output_dir=work,
            max_steps=steps,
            per_device_train_batch_size=batch_size,
            learning_rate=rate,
            lr_scheduler_type="linear",
            seed=seed,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            logging_steps=max(1, steps // 10),
            disable_tqdm=True,
            bf16=bf16,
        )
        if distill:
            trainer = distill_for_recovery(student, teacher_model, args, rows, alpha=alpha, temperature=temperature)
        else:
            trainer = Trainer(model=student, args=args, train_dataset=rows)
            trainer.train()
    model = trainer.model.merge_and_unload() if lora else trainer.model
    how = [f"{steps} optimizer steps × {batch_size} windows of {seq_len} tokens from `{data}`"]
    how[0] += f", learning rate {rate:g}"
    if distill:
        name = teacher if not isinstance(teacher, nn.Module) else getattr(teacher.config, "_name_or_path", "")
        how.append(f"distillation from `{name or 'a model passed in memory'}` (α = {alpha:g}, T = {temperature:g})")
    if lora:
        how.append("LoRA adapters (r=8, every linear layer), merged into the weights")
    note = (
        "\n\n## Recovery\n\nFine-tuned after pruning with `hf-prune recover` "
        f"(`hf_prune.training.recovery.recover_folder`): {'; '.join(how)}. Quality and speed numbers above, if any, "
        "were measured before this recovery.\n"
    )

    def write(staging: Path) -> None:
        for item in folder.iterdir():
            if item.is_file() and not _WEIGHT_FILES.match(item.name):
                shutil.copy2(item, staging / item.name)
        model.save_pretrained(staging)
        readme = staging / "README.md"
        readme.write_text((readme.read_text() if readme.is_file() else "") + note)

    return write_atomically(output, write, overwrite=False)


def _load_teacher(teacher: str | os.PathLike | nn.Module) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    try:
        return load_pruned(teacher)
    except (OSError, PrunedCheckpointError) as error:
        raise UsageError(
            f"the teacher {str(teacher)!r} cannot be loaded ({error}); pass the dense model's folder or Hub id as "
            "teacher= (CLI: --teacher)."
        ) from error
