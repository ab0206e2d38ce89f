"""The recovery recipe: one-shot prune, short LoRA fine-tune, adapter pointing at the pruned model."""

import json

import pytest
import torch
from peft import LoraConfig
from tiny_models import FAMILIES, STRUCTURAL
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import HFPruner
from hf_prune.errors import UsageError
from hf_prune.training.recovery import DistillationCallback, distill_for_recovery, load_recovered, lora_for_recovery

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


class TrainingLoss(TrainerCallback):
    """After each step: the loss a training forward returns on `batch`, and the student's eval logits."""

    def __init__(self, batch):
        self.batch, self.results = batch, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.train()
        loss = float(model(**self.batch).loss.detach())
        model.eval()
        with torch.no_grad():
            self.results.append((loss, model(input_ids=self.batch["input_ids"]).logits))


def test_distillation_recovery_learns_from_the_dense_teacher(tmp_path):
    family, alpha, temperature = FAMILIES["llama"], 0.6, 2.0
    pruner = HFPruner(family.build())
    pruner.prune(mlp_neurons=0.5, **STRUCTURAL)
    student = lora_for_recovery(
        pruner.save_pretrained(tmp_path / "pruned"), LoraConfig(r=4, target_modules="all-linear")
    )
    dense = family.build()
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, 97, (12,), generator=generator)), "labels": ids} for _ in range(8)]
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows[:2]]), "labels": None}
    batch["labels"] = batch["input_ids"]
    with torch.no_grad():
        teacher = dense(input_ids=batch["input_ids"]).logits.double()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    probe = TrainingLoss(batch)
    distill_for_recovery(student, dense, args, rows, alpha=alpha, temperature=temperature, callbacks=[probe])
    assert len(probe.results) == 2
    for loss, logits in probe.results:  # α·T²·KL + (1 − α)·CE over the shifted positions, in plain torch
        s, t, y = logits[:, :-1].double(), teacher[:, :-1], batch["labels"][:, 1:]
        kl = (
            torch.softmax(t / temperature, -1)
            * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))
        ).sum(-1)
        ce = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
        torch.testing.assert_close(
            loss, float(alpha * temperature**2 * kl.mean() + (1 - alpha) * ce), rtol=1e-5, atol=1e-6
        )
    student.train()
    with torch.no_grad():  # after training the loss is the task loss again
        assert torch.isclose(
            student(**batch).loss,
            torch.nn.functional.cross_entropy(
                probe.results[-1][1][:, :-1].reshape(-1, 97), batch["labels"][:, 1:].reshape(-1)
            ),
            rtol=1e-5,
        )
    with pytest.raises(UsageError, match="needs its dense model as teacher"):
        DistillationCallback(None)
