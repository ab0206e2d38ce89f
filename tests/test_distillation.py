"""Distillation from the dense model inside `PruningCallback`, on tiny models and tiny `Trainer` runs:
the loss the Trainer sees against a plain-torch α·T²·KL + (1 − α)·CE, the KD term at zero before masking,
gradient accumulation, resuming with a passed teacher, a PEFT student as its own teacher (no copy), evaluation,
refusals, the card."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from test_callback import arguments, dataset, effective_weight
from tiny_models import FAMILIES
from transformers import Trainer, TrainerCallback

from hf_prune import Distillation, PruningCallback, PruningConfig
from hf_prune.errors import CallbackStateError, TeacherMismatchError, UsageError
from hf_prune.groups import get_adapter
from hf_prune.masking import masked_slices
from hf_prune.training.schedule import PruningSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = dict(mlp_neurons=0.5, attention_heads=0.5)
SCHEDULE = PruningSchedule("cubic", start_step=1, end_step=2, frequency=1)  # 0 % at step 1, 100 % at step 2
BATCH = {"input_ids": torch.stack([row["input_ids"] for row in dataset(3)[1:]])}
BATCH["labels"] = BATCH["input_ids"].clone()


def reference_loss(student_logits, teacher_logits, labels, alpha, temperature):
    """α·T²·KL(p_T ‖ p_S) + (1 − α)·CE over the shifted next-token positions, in plain torch."""
    s, t, y = student_logits[:, :-1].double(), teacher_logits[:, :-1].double(), labels[:, 1:]
    p_teacher = torch.softmax(t / temperature, -1)
    kl = (p_teacher * (torch.log_softmax(t / temperature, -1) - torch.log_softmax(s / temperature, -1))).sum(-1)
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    return alpha * temperature**2 * kl.mean() + (1 - alpha) * ce


def logits(model, inputs):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(**inputs).logits
    model.train(was_training)
    return out


class TrainerLoss(TrainerCallback):
    """After each step's masks: the loss `trainer.compute_loss` returns on BATCH (a training forward)."""

    def __init__(self):
        self.trainer = None
        self.losses: list[float] = []
        self.student_logits: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.train()
        self.losses.append(float(self.trainer.compute_loss(model, dict(BATCH)).detach()))
        self.student_logits.append(logits(model, {"input_ids": BATCH["input_ids"]}))


def run(tmp_path, model, pruning, *extra, **overrides):
    probe = TrainerLoss()
    trainer = Trainer(
        model=model,
        args=arguments(tmp_path, max_steps=3, **overrides),
        train_dataset=dataset(),
        callbacks=[pruning, probe, *extra],
    )
    probe.trainer = trainer
    trainer.train()
    return trainer, probe


def test_the_trainer_loss_is_alpha_t2_kl_plus_task_loss_zero_kd_before_masking(tmp_path):
    alpha, temperature = 0.3, 2.0
    teacher = FAMILIES["llama"].build()  # the same weights as the student at the start
    teacher_logits = logits(teacher, {"input_ids": BATCH["input_ids"]})
    pruning = PruningCallback(
        PruningConfig(**CONFIG), SCHEDULE, distill=Distillation(alpha=1.0, temperature=temperature), pruned_dir=None
    )
    # lr 0, α = 1: before the first mask the student is its teacher, so the loss (the KD term) is exactly 0.
    trainer, probe = run(
        tmp_path / "zero",
        FAMILIES["llama"].build(),
        pruning,
        learning_rate=0.0,
        logging_strategy="steps",
        logging_steps=1,
    )
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[:2] == [0.0, 0.0] and logged[2] > 1e-3  # the first masks (all of them) come at step 2's end
    assert probe.losses[0] == 0.0 and probe.losses[1] > 1e-3  # the same, measured after each step's masks
    for loss, student_logits in zip(probe.losses, probe.student_logits, strict=True):
        expected = reference_loss(student_logits, teacher_logits, BATCH["labels"], 1.0, temperature)
        torch.testing.assert_close(loss, float(expected), rtol=1e-5, atol=1e-6)

    # Training moves the student; the teacher stays the dense model of step 0.
    pruning = PruningCallback(
        PruningConfig(**CONFIG), SCHEDULE, distill=Distillation(alpha=alpha, temperature=temperature), pruned_dir=None
    )
    trainer, probe = run(tmp_path / "mixed", FAMILIES["llama"].build(), pruning)
    for loss, student_logits in zip(probe.losses, probe.student_logits, strict=True):
        expected = reference_loss(student_logits, teacher_logits, BATCH["labels"], alpha, temperature)
        torch.testing.assert_close(loss, float(expected), rtol=1e-5, atol=1e-6)


class EvaluationLoss(TrainerCallback):
    """After each step, while distillation is on: `trainer.evaluate` on BATCH, and the student's logits."""

    def __init__(self):
        self.trainer = None
        self.results: list[tuple[float, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        rows = [{"input_ids": ids, "labels": ids} for ids in BATCH["input_ids"]]
        evaluated = self.trainer.evaluate(eval_dataset=rows)["eval_loss"]
        self.results.append((evaluated, logits(model, {"input_ids": BATCH["input_ids"]})))


def test_evaluation_reports_the_task_loss_alone(tmp_path):
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=True, compact_at_end=False)
    probe = EvaluationLoss()
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=3, per_device_eval_batch_size=2),
        train_dataset=dataset(),
        callbacks=[pruning, probe],
    )
    probe.trainer = trainer
    trainer.train()
    assert len(probe.results) == 3
    for evaluated, student in probe.results:
        expected = reference_loss(student, student, BATCH["labels"], 0.0, 1.0)  # CE alone
        torch.testing.assert_close(evaluated, float(expected), rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_gives_the_weights_of_the_large_batch(tmp_path):
    def weights(output_dir, batch, accumulation):
        model = FAMILIES["llama"].build()
        pruning = PruningCallback(
            PruningConfig(**CONFIG), SCHEDULE, distill=Distillation(alpha=0.5, temperature=2.0), compact_at_end=False
        )
        Trainer(
            model=model,
            args=arguments(
                output_dir,
                max_steps=3,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                learning_rate=1e-3,
            ),
            train_dataset=dataset(),
            callbacks=[pruning],
        ).train()
        return pruning.plan, {name: value.detach().clone() for name, value in model.named_parameters()}

    (plan, whole), (plan_accumulated, accumulated) = weights(tmp_path / "a", 2, 1), weights(tmp_path / "b", 1, 2)
    assert [layer.to_dict() for layer in plan_accumulated.layers] == [layer.to_dict() for layer in plan.layers]
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-5, msg=name)


class PeftTeacherProbe(TrainerCallback):
    """At every step end: the teacher is the student itself and its logits are the dense base's."""

    def __init__(self, pruning, dense_logits, parameters):
        self.pruning, self.dense_logits, self.parameters = pruning, dense_logits, parameters
        self.checked = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        distiller = self.pruning._distiller
        assert distiller.teacher is model and distiller.shares_student
        assert sum(p.numel() for p in model.parameters()) == self.parameters
        masked = logits(model, {"input_ids": BATCH["input_ids"]})
        teacher = distiller.teacher_logits((), {"input_ids": BATCH["input_ids"]})
        torch.testing.assert_close(teacher, self.dense_logits, rtol=0, atol=1e-6)
        torch.testing.assert_close(logits(model, {"input_ids": BATCH["input_ids"]}), masked, rtol=0, atol=0)
        adapter = get_adapter(model.config)
        for index, layer in enumerate(adapter.layers(model)):  # the masks are back after the teacher ran
            for piece in masked_slices(adapter, layer, self.pruning.plan.layers[index]):
                view = effective_weight(layer, piece.parameter).narrow(
                    piece.dim, piece.start, piece.stop - piece.start
                )
                assert torch.count_nonzero(view) == 0
        self.checked += 1


def test_a_peft_student_is_its_own_teacher_without_a_copy(tmp_path):
    dense_logits = logits(FAMILIES["llama"].build(), {"input_ids": BATCH["input_ids"]})
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(FAMILIES["llama"].build(), lora)
    parameters = sum(p.numel() for p in model.parameters())
    pruning = PruningCallback(PruningConfig(**CONFIG, mlp_branches=1), SCHEDULE, distill=True, pruned_dir=None)
    probe = PeftTeacherProbe(pruning, dense_logits, parameters)
    _, losses = run(tmp_path, model, pruning, probe)
    assert probe.checked == 3
    assert all(loss > 0 for loss in losses.losses)
    assert pruning.pruned_model is not None  # compaction after distillation: adapters merged, cut


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path):
    family = FAMILIES["llama"]
    other = type(family.build())(type(family.build().config)(**{**family.config, "vocab_size": 50}))
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=Distillation(teacher=other))
    with pytest.raises(TeacherMismatchError, match="teacher has 50 output logits.*the student 97"):
        run(tmp_path, family.build(), pruning)
    with pytest.raises(UsageError, match="distill must be None, True or a Distillation"):
        PruningCallback(PruningConfig(**CONFIG), distill="yes")
    with pytest.raises(UsageError, match=r"alpha=1.5\) must lie in \[0, 1\]"):
        Distillation(alpha=1.5)


def test_resuming_without_a_teacher_is_refused(tmp_path):
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=True, compact_at_end=False)
    Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=3, save_strategy="steps", save_steps=2),
        train_dataset=dataset(),
        callbacks=[pruning],
    ).train()
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=True, compact_at_end=False)
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=3),
        train_dataset=dataset(),
        callbacks=[pruning],
    )
    with pytest.raises(CallbackStateError, match=r"pass the dense model as Distillation\(teacher=...\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_resuming_with_the_teacher_gives_the_uninterrupted_weights(tmp_path):
    """Stop after step 2, resume from checkpoint-2 with the dense model passed as the teacher: the weights
    after step 5 equal those of the run that was never interrupted (same masks, same KD targets)."""

    def train(output_dir, resume=None):
        teacher = FAMILIES["llama"].build().eval()  # the dense model, rebuilt: what the student started as
        pruning = PruningCallback(
            PruningConfig(**CONFIG),
            SCHEDULE,
            distill=Distillation(alpha=0.5, temperature=2.0, teacher=teacher),
            compact_at_end=False,
        )
        trainer = Trainer(
            model=FAMILIES["llama"].build(),
            args=arguments(output_dir, max_steps=5, save_strategy="steps", save_steps=2, learning_rate=1e-3),
            train_dataset=dataset(),
            callbacks=[pruning],
        )
        trainer.train(resume_from_checkpoint=resume)
        return pruning.plan, trainer.model.state_dict()

    plan, whole = train(tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed_plan, resumed = train(tmp_path / "resumed", resume=True)
    assert [layer.to_dict() for layer in resumed_plan.layers] == [layer.to_dict() for layer in plan.layers]
    for name, value in whole.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)


def test_the_card_says_the_model_was_distilled(tmp_path):
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=Distillation(alpha=0.7, temperature=2.0))
    run(tmp_path, FAMILIES["llama"].build(), pruning)
    card = (tmp_path / "pruned" / "README.md").read_text()
    assert (
        "- **Distillation:** loss α·T²·KL(teacher ‖ student) + (1 − α)·task loss with α = 0.7, T = 2; "
        "teacher: the unpruned model, frozen at the start of training\n" in card
    )
    assert "from hf_prune import Distillation, PruningCallback" in card
    assert "distill=Distillation(alpha=0.7, temperature=2)" in card


@pytest.mark.parametrize("passed", [False, True], ids=["frozen-copy", "passed-teacher"])
def test_bf16_autocast_runs_the_teacher_like_the_student(tmp_path, passed):
    teacher = FAMILIES["llama"].build() if passed else None  # the student's weights, in fp32
    distill = Distillation(alpha=1.0, teacher=teacher)
    pruning = PruningCallback(PruningConfig(**CONFIG), SCHEDULE, distill=distill, pruned_dir=None)
    _, probe = run(tmp_path, FAMILIES["llama"].build(), pruning, learning_rate=0.0, bf16=True)
    assert probe.losses[0] == 0.0  # the same bf16 forward on both sides: exactly no KD before masking
    assert probe.losses[1] > 1e-3


class ImageLoss(TrainerCallback):
    def __init__(self, images, labels):
        self.trainer, self.images, self.labels = None, images, labels
        self.results: list[tuple[float, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        model.train()
        loss = self.trainer.compute_loss(model, {"pixel_values": self.images, "labels": self.labels})
        self.results.append((float(loss.detach()), logits(model, {"pixel_values": self.images})))


def test_an_image_classifier_distils_its_class_logits(tmp_path):
    alpha, temperature = 0.4, 3.0
    family = FAMILIES["vit"]
    generator = torch.Generator().manual_seed(0)
    size, classes = family.config.get("image_size", 16), family.build().config.num_labels
    rows = [
        {"pixel_values": torch.randn(3, size, size, generator=generator), "labels": int(label)}
        for label in torch.randint(0, classes, (16,), generator=generator)
    ]
    images, labels = (
        torch.stack([row["pixel_values"] for row in rows[:3]]),
        torch.tensor([r["labels"] for r in rows[:3]]),
    )
    teacher = logits(family.build(), {"pixel_values": images}).double()
    pruning = PruningCallback(
        PruningConfig(mlp_neurons=0.5), SCHEDULE, distill=Distillation(alpha=alpha, temperature=temperature)
    )
    probe = ImageLoss(images, labels)
    trainer = Trainer(
        model=family.build(), args=arguments(tmp_path, max_steps=3), train_dataset=rows, callbacks=[pruning, probe]
    )
    probe.trainer = trainer
    trainer.train()
    for loss, student in probe.results:
        student = student.double()
        kl = (
            torch.softmax(teacher / temperature, -1)
            * (torch.log_softmax(teacher / temperature, -1) - torch.log_softmax(student / temperature, -1))
        ).sum(-1)
        expected = alpha * temperature**2 * kl.mean() + (1 - alpha) * F.cross_entropy(student, labels)
        torch.testing.assert_close(loss, float(expected), rtol=1e-5, atol=1e-6)
    assert probe.results[-1][0] != probe.results[0][0]
