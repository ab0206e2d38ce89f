"""Recovery after a one-shot prune (LLM-Pruner style): a short LoRA fine-tune on the pruned model.

```python
pruner.prune(mlp_neurons=0.5); pruner.save_pretrained("pruned")
model = lora_for_recovery("pruned")                       # PeftModel over the pruned checkpoint
Trainer(model=model, args=args, train_dataset=data).train()
model.save_pretrained("adapter")                          # adapter_config.json names "pruned" as its base
model = load_recovered("adapter")                         # base (either format) + adapter; merge=True merges
```

The adapter's `base_model_name_or_path` is the pruned folder, never the dense model it came
from, so the adapter is only ever applied to the shapes it was trained on. Loader-format bases
need `load_pruned`, which plain `AutoPeftModel` does not call: `load_recovered` does.

Method notes and sources: docs/methods.md §6.4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from ..errors import PrunedCheckpointError
from ..output.checkpoint import load_pruned


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
