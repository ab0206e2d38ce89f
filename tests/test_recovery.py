"""The recovery recipe: one-shot prune, short LoRA fine-tune, adapter pointing at the pruned model."""

import json

import pytest
import torch
from tiny_models import FAMILIES, STRUCTURAL
from transformers import Trainer, TrainingArguments

from hf_prune import HFPruner
from hf_prune.training.recovery import load_recovered, lora_for_recovery

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("amounts", [{"mlp_neurons": 0.5}, {"attention_heads": 0.5, "mlp_branches": 1}])
def test_lora_recovery_adapter_points_at_the_pruned_model_and_reloads(tmp_path, amounts):
    family = FAMILIES["llama"]
    pruner = HFPruner(family.build())
    report = pruner.prune(**amounts, **STRUCTURAL)
    pruned_folder = pruner.save_pretrained(tmp_path / "pruned")

    model = lora_for_recovery(pruned_folder)
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 97, (12,), generator=generator)), "labels": ids} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    model.save_pretrained(tmp_path / "adapter")

    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(pruned_folder)
    inputs = family.inputs()
    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        reloaded = load_recovered(tmp_path / "adapter").eval()
        merged = load_recovered(tmp_path / "adapter", merge=True).eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in merged.parameters()) == report.parameters_after
