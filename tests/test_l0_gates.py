"""`PruningCallback(score="l0")`: hard-concrete gates learned with the task loss, on tiny models, a few
steps each. The gates train, masked groups stay exactly zero, the targets are met at `end_step`, the cut
model equals the gated, masked model and holds no gate tensors, resuming reproduces masks and gates."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from test_callback import SCHEDULE, arguments, dataset, logits, train
from tiny_models import FAMILIES
from transformers import Trainer

from hf_prune import PruningConfig, load_pruned
from hf_prune.errors import GatesNotAttachedError, InvalidPruningTargetError, UsageError
from hf_prune.training.callback import STATE_FOLDER, PruningCallback
from hf_prune.training.l0_gates import L0Settings, find_gates

pytestmark = pytest.mark.usefixtures("one_thread")

GATED = {
    "llama": PruningConfig(kv_groups=1, attention_heads=0.5, mlp_neurons=0.5),
    "gpt2": PruningConfig(attention_heads=0.25, mlp_neurons=0.5),
}


def gated_run(output_dir, family="llama", resume=None, **overrides):
    model = FAMILIES[family].build()
    pruning = PruningCallback(GATED[family], SCHEDULE, score="l0", compact_at_end=overrides.pop("compact", True))
    pruning.attach_gates(model)
    trainer, before, after = train(output_dir, model, pruning, resume, family=family, **overrides)
    return pruning, trainer, before, after


def test_attached_gates_leave_the_model_unchanged_sample_in_training_and_receive_gradients():
    model = FAMILIES["llama"].build()
    inputs = FAMILIES["llama"].inputs()
    dense = logits(model, inputs)
    gates = PruningCallback(GATED["llama"], score="l0").attach_gates(model)
    assert sorted(gates.kinds) == ["heads", "neurons"]
    torch.testing.assert_close(logits(model, inputs), dense, atol=0, rtol=0)  # eval gates start at exactly 1

    model.train()
    torch.manual_seed(1)
    sampled = model(**inputs).logits.detach()
    torch.manual_seed(0)
    assert not torch.equal(model(**inputs).logits.detach(), sampled)  # hard-concrete samples in training mode
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    # At log α = 3 most samples clamp at 1 (no gradient there); the unclamped ones carry the task's.
    assert sum(parameter.grad.abs().sum() for parameter in gates.parameters_by_key.values()) > 0

    model = FAMILIES["llama"].build().train()
    settings = L0Settings(initial_log_alpha=0.0)  # samples inside (0, 1): every gate gets a gradient
    gates = PruningCallback(GATED["llama"], score="l0", l0=settings).attach_gates(model)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for name, parameter in gates.parameters_by_key.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_l0_masks_are_exact_meet_the_targets_and_compaction_equals_the_gated_model(tmp_path, family):
    pruning, _, before, after = gated_run(tmp_path, family)

    # AfterEachStep asserted every masked consumer slice was exactly zero after every step.
    for earlier, later in zip(after.removed, after.removed[1:]):
        assert earlier <= later
    final = after.counts[-1]
    if family == "llama":
        assert (final["kv_groups"], final["attention_heads"], final["mlp_neurons"]) == (1, 1, 24)
    else:
        assert (final["attention_heads"], final["mlp_neurons"]) == (1, 24)
    assert set(pruning.penalty.multipliers) == {"heads", "neurons"}
    assert all(multipliers[1] > 0 for multipliers in pruning.penalty.multipliers.values())
    for kind, target in pruning.penalty.targets.items():  # the penalty pulled the gates to the targets
        assert abs(pruning.penalty.expected[kind] - target) < 0.1, (kind, pruning.penalty.expected)

    inputs = FAMILIES[family].inputs()
    pruned = pruning.pruned_model
    assert find_gates(pruned) is None and not any("gates" in name for name in pruned.state_dict())
    torch.testing.assert_close(logits(pruned, inputs), before.logits, atol=1e-5, rtol=0)
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as saved:
        assert not any("gates" in key for key in saved.keys())  # noqa: SIM118 (safe_open is not iterable)
    reloaded = load_pruned(tmp_path / "pruned")  # plain transformers where the config can express the shapes
    torch.testing.assert_close(logits(reloaded, inputs), before.logits, atol=1e-5, rtol=0)


def test_l0_gates_with_lora_fold_into_base_and_adapters_before_the_merge(tmp_path):
    model = FAMILIES["llama"].build()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(model, lora)
    pruning = PruningCallback(PruningConfig(attention_heads=0.5, mlp_neurons=0.5), SCHEDULE, score="l0")
    pruning.attach_gates(model)  # after get_peft_model, which would freeze them
    _, before, _ = train(tmp_path, model, pruning)  # AfterEachStep checks W + s·B·A

    pruned = pruning.pruned_model
    assert not any("lora" in name or "gates" in name for name in pruned.state_dict())
    torch.testing.assert_close(logits(pruned, FAMILIES["llama"].inputs()), before.logits, atol=1e-5, rtol=0)


def test_l0_with_gradient_accumulation_keeps_masks_exact_and_meets_the_targets(tmp_path):
    pruning, _, _, after = gated_run(
        tmp_path, compact=False, per_device_train_batch_size=1, gradient_accumulation_steps=2
    )
    assert (after.counts[-1]["kv_groups"], after.counts[-1]["mlp_neurons"]) == (1, 24)  # AfterEachStep: exact zeros
    assert all(abs(pruning.penalty.expected[kind] - t) < 0.1 for kind, t in pruning.penalty.targets.items())


def test_l0_resume_reproduces_masks_gates_and_multipliers(tmp_path):
    def run(output_dir, resume=None):
        pruning, trainer, _, _ = gated_run(
            output_dir, resume=resume, compact=False, save_strategy="steps", save_steps=3
        )
        return pruning, trainer.model

    whole, whole_model = run(tmp_path / "whole")
    saved = json.loads((tmp_path / "whole" / "checkpoint-3" / STATE_FOLDER / "state.json").read_text())
    assert set(saved["lagrangian"]["multipliers"]) == {"heads", "neurons"}
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, resumed_model = run(tmp_path / "resumed", resume=True)

    assert [p.to_dict() for p in resumed.plan.layers] == [p.to_dict() for p in whole.plan.layers]
    assert resumed.penalty.multipliers == whole.penalty.multipliers
    for (name, value), (_, other) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(value, other), name


def test_forgotten_or_late_gates_and_ungated_targets_are_refused(tmp_path):
    pruning = PruningCallback(GATED["llama"], SCHEDULE, score="l0")
    with pytest.raises(GatesNotAttachedError, match=r"callback\.attach_gates\(model\) before Trainer"):
        train(tmp_path / "none", FAMILIES["llama"].build(), pruning)

    model = FAMILIES["llama"].build()
    pruning = PruningCallback(GATED["llama"], SCHEDULE, score="l0")
    trainer = Trainer(model=model, args=arguments(tmp_path / "late"), train_dataset=dataset(), callbacks=[pruning])
    trainer.create_optimizer()
    pruning.attach_gates(model)
    with pytest.raises(GatesNotAttachedError, match="not in the Trainer's optimizer"):
        trainer.train()

    with pytest.raises(InvalidPruningTargetError, match="gates heads and MLP neurons only"):
        PruningCallback(PruningConfig(mlp_neurons=0.5, layers=1), score="l0").attach_gates(FAMILIES["llama"].build())
    with pytest.raises(UsageError, match="attach_gates\\(\\) is for score='l0'"):
        PruningCallback(GATED["llama"]).attach_gates(FAMILIES["llama"].build())
    with pytest.raises(UsageError, match="configures score='l0'"):
        PruningCallback(GATED["llama"], l0=L0Settings())
