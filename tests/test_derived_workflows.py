"""Derived adapters go wherever hand-written ones go (issue 15, item 5): layer-by-layer pruning from
safetensors shards, the `PruningCallback` during fine-tuning, and the saved folder's recipe and card.

The model types here have no file in hf_prune/groups/; each reference is the in-memory prune or the
masked model, computed independently of the path under test."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import calibration_windows
from transformers import Trainer, TrainingArguments

from hf_prune import HFPruner, PruningConfig, load_pruned
from hf_prune.derivation.derive import DerivedAdapter, build_tiny
from hf_prune.groups import get_adapter
from hf_prune.groups.registry import _ADAPTERS
from hf_prune.masking import apply_masks
from hf_prune.training.callback import PruningCallback
from hf_prune.training.schedule import PruningSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = {
    "calibration": calibration_windows(),
    "num_samples": 8,
    "seq_len": 16,
    "batch_size": 4,
    "reconstruct": "lstsq",
}
#: type → (config class, amounts): MHA (OLMo) and GQA (Cohere 2, sliding-window layer types)
CASES = {
    "olmo": (transformers.OlmoConfig, {"kv_groups": 1, "mlp_neurons": 0.25, "layers": 1}),
    "cohere2": (transformers.Cohere2Config, {"kv_groups": 1, "mlp_neurons": 0.25, "layers": 1}),
}
FORMAT = {"olmo": "loader", "cohere2": "vanilla"}


@pytest.mark.parametrize("model_type", sorted(CASES))
def test_low_memory_prunes_a_derived_type_as_in_memory(model_type, tmp_path):
    config_class, amounts = CASES[model_type]
    assert model_type not in _ADAPTERS
    dense, _ = build_tiny(config_class, seed=5)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    in_memory = HFPruner.from_pretrained(tmp_path / "dense")
    assert isinstance(in_memory.adapter, DerivedAdapter)
    in_memory.prune(**SETTINGS, **amounts)
    expected = load_pruned(in_memory.save_pretrained(tmp_path / "in_memory")).state_dict()
    layered = HFPruner.from_pretrained(tmp_path / "dense", low_memory=True)
    layered.prune(**SETTINGS, **amounts)
    got = load_pruned(layered.save_pretrained(tmp_path / "low_memory")).state_dict()
    # OLMo's head size is hidden_size / num_attention_heads: fewer heads need the loader format
    assert layered.report.output_format == in_memory.report.output_format == FORMAT[model_type]
    assert sorted(got) == sorted(expected)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-5)


def test_callback_prunes_a_derived_type_during_fine_tuning(tmp_path):
    """Masks during training, the cut at the end equals the masked model, the folder reloads with
    plain transformers and carries its recipe and card."""
    config_class, amounts = CASES["cohere2"]
    model, inputs = build_tiny(config_class, seed=7)
    config = PruningConfig(**{**amounts, "criterion": "magnitude"})
    pruning = PruningCallback(config, PruningSchedule("cubic", start_step=1, end_step=4, frequency=1))
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (16, 12), generator=generator)]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    masked = {}

    class BeforeCut(transformers.TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            reference = copy.deepcopy(model)
            apply_masks(reference, get_adapter(model.config), pruning.plan)  # idempotent on the masked model
            with torch.no_grad():
                masked["logits"] = reference(**inputs).logits

    trainer = Trainer(model=model, args=arguments, train_dataset=rows, callbacks=[BeforeCut(), pruning])
    trainer.train()
    assert isinstance(get_adapter(trainer.model.config), DerivedAdapter)
    assert pruning.report.parameters_after < pruning.report.parameters_before
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(**inputs).logits, masked["logits"], atol=1e-5, rtol=0)
    folder = tmp_path / "run" / "pruned"  # written by the callback at the end of training
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked["logits"], atol=1e-5, rtol=0)
    assert PruningConfig.from_yaml(folder / "hf_prune_recipe.yaml") == config
    card = (folder / "README.md").read_text()
    assert "## Pruned during fine-tuning" in card
