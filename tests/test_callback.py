"""`PruningCallback` with a real `transformers.Trainer` on tiny models, a few steps each: masks stay exact
after every step and only grow, the targets are met at `end_step`, resuming reproduces the masks bit for
bit, compaction equals the masked model, LoRA adapters are masked and merged, gradient accumulation."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, get_peft_model
from tiny_models import FAMILIES
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import PruningConfig, load_pruned
from hf_prune.allocation import plan_for
from hf_prune.criteria.random import RandomCriterion
from hf_prune.errors import CallbackStateError, InvalidPruningTargetError, InvalidScheduleError
from hf_prune.groups import get_adapter
from hf_prune.masking import masked_slices
from hf_prune.training.callback import STATE_FOLDER, PruningCallback
from hf_prune.training.gradual import final_counts, is_removed
from hf_prune.training.schedule import PruningSchedule

TARGETS = {
    "llama": dict(kv_groups=1, attention_heads=0.5, mlp_neurons=0.5, mlp_branches=1, layers=1),
    "gpt2": dict(attention_heads=0.25, mlp_neurons=0.5, attention_branches=1, layers=1),
}
SCHEDULE = PruningSchedule("cubic", start_step=1, end_step=5, frequency=1)


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(count: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(3, 97, (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=1e-2,  # large: masked weights would visibly drift if they were not re-masked
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    return TrainingArguments(**{**settings, **overrides})


def effective_weight(layer, name: str) -> torch.Tensor:
    """A parameter as the forward pass uses it: base weight plus the merged LoRA delta, if any."""
    module_name, _, attribute = name.rpartition(".")
    module = layer.get_submodule(module_name)
    value = layer.get_parameter(name).detach()
    if attribute == "weight" and hasattr(module, "get_delta_weight"):
        value = value + module.get_delta_weight("default")
    return value


class AfterEachStep(TrainerCallback):
    """Registered after the PruningCallback: checks every step's masks once they are applied."""

    def __init__(self, pruning: PruningCallback):
        self.pruning = pruning
        self.removed: list[set[tuple]] = []
        self.counts: list[dict[str, int]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        pruning, adapter = self.pruning, get_adapter(model.config)
        removed = set()
        for index, layer in enumerate(adapter.layers(model)):
            layer_plan = pruning.plan.layers[index]
            if layer_plan.keep_layer:
                for piece in masked_slices(adapter, layer, layer_plan):
                    view = effective_weight(layer, piece.parameter).narrow(
                        piece.dim, piece.start, piece.stop - piece.start
                    )
                    assert torch.count_nonzero(view) == 0, (state.global_step, index, piece)
            for kind in ("heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"):
                removed |= {
                    (kind, index, g.index) for g in adapter.groups(layer, index, kind) if is_removed(pruning.plan, g)
                }
        self.removed.append(removed)
        self.counts.append(final_counts(pruning.plan))


class MaskedLogitsAtEnd(TrainerCallback):
    """Registered before the PruningCallback: the masked model's logits just before compaction."""

    def __init__(self, inputs: dict):
        self.inputs = inputs
        self.logits = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, self.inputs)


def logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def train(output_dir, model, pruning: PruningCallback, resume=None, family="llama", **overrides):
    before, after = MaskedLogitsAtEnd(FAMILIES[family].inputs()), AfterEachStep(pruning)
    trainer = Trainer(
        model=model,
        args=arguments(output_dir, **overrides),
        train_dataset=dataset(),
        callbacks=[before, pruning, after],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, before, after


@pytest.mark.parametrize("score", ["taylor", "movement", "activation", "criterion"])
def test_masks_are_exact_after_every_step_only_grow_and_meet_the_targets(tmp_path, score):
    model = FAMILIES["llama"].build()
    # score="criterion" ranks with the config's criterion on the weights: a data-free one.
    config = PruningConfig(**TARGETS["llama"], **({"criterion": "magnitude"} if score == "criterion" else {}))
    pruning = PruningCallback(config, SCHEDULE, score=score, compact_at_end=False)
    _, _, after = train(tmp_path, model, pruning)

    assert len(after.removed) == 6
    assert after.removed[0] == set()  # step 1 is the first event, at fraction 0
    for earlier, later in zip(after.removed, after.removed[1:]):
        assert earlier <= later  # once masked, always masked
    dense = FAMILIES["llama"].build()
    target = final_counts(plan_for(dense, get_adapter(dense.config), config, RandomCriterion()))
    assert target == {
        "kv_groups": 1,
        "attention_heads": 1,
        "mlp_neurons": 24,
        "mlp_branches": 1,
        "layers": 1,
        "attention_branches": 0,
    }
    resolved = SCHEDULE.resolved(6)
    for step, counts in enumerate(after.counts, start=1):
        fraction = resolved.fraction(step)
        assert counts == {kind: int(fraction * count + 0.5) for kind, count in target.items()}, step
    assert after.counts[-1] == target and after.counts[2]["mlp_neurons"] == 21  # 24 · (1 − 0.5³)


def test_bf16_mixed_precision_keeps_masks_exact_and_compacts(tmp_path):
    model = FAMILIES["llama"].build()
    pruning = PruningCallback(PruningConfig(**TARGETS["llama"]), SCHEDULE)
    trainer, before, after = train(tmp_path, model, pruning, bf16=True)  # AfterEachStep checks every step
    assert after.counts[-1]["mlp_neurons"] == 24
    torch.testing.assert_close(logits(trainer.model, FAMILIES["llama"].inputs()), before.logits, atol=1e-5, rtol=0)


def saved_card(folder: Path) -> tuple[dict, str]:
    """The README's YAML metadata and body; every file the body links to exists in the folder."""
    _, front_matter, body = (folder / "README.md").read_text().split("---\n", 2)
    links = set(re.findall(r"\]\(([^)]+)\)", body))
    assert {"pruning_plot.png", "hf_prune_recipe.yaml"} <= links
    assert all((folder / link).is_file() for link in links if "://" not in link), links
    assert (folder / "pruning_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return yaml.safe_load(front_matter), body


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compaction_at_train_end_equals_the_masked_model_and_is_saved(tmp_path, monkeypatch, family):
    def load(repo_id):  # the base model's card on the Hub, as ModelCard.load reads it
        assert repo_id == f"some-org/tiny-{family}"
        return ModelCard("---\nlicense: apache-2.0\n---\n")

    monkeypatch.setattr(ModelCard, "load", load)
    model = FAMILIES[family].build()
    dense = sum(p.numel() for p in model.parameters())
    model.config._name_or_path = f"some-org/tiny-{family}"  # as from_pretrained("some-org/tiny-...") sets it
    pruning = PruningCallback(PruningConfig(**TARGETS[family]), SCHEDULE)
    trainer, before, _ = train(tmp_path, model, pruning, family=family)

    inputs = FAMILIES[family].inputs()
    assert trainer.model is pruning.pruned_model
    assert pruning.report.parameters_after < pruning.report.parameters_before
    assert sum(p.numel() for p in trainer.model.parameters()) == pruning.report.parameters_after
    torch.testing.assert_close(logits(trainer.model, inputs), before.logits, atol=1e-5, rtol=0)
    folder = tmp_path / "pruned"
    torch.testing.assert_close(logits(load_pruned(folder), inputs), before.logits, atol=1e-5, rtol=0)

    # The card is the template's: Hub metadata, plot and recipe links, and what the callback did.
    metadata, body = saved_card(folder)
    assert metadata == {
        "base_model": f"some-org/tiny-{family}",
        "license": "apache-2.0",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["pruned", "structured-pruning", "hf_prune"],
    }
    assert PruningConfig.from_yaml(folder / "hf_prune_recipe.yaml") == PruningConfig(**TARGETS[family])
    pruned = sum(p.numel() for p in load_pruned(folder).parameters())
    assert f"| parameters | {dense:,} | {pruned:,} | {(pruned - dense) / dense:+.1%} |" in body
    assert "## Pruned during fine-tuning" in body and "`PruningCallback`" in body
    assert "- **Schedule:** `cubic` from step 1 to step 5, every step, starting at 0% of the targets\n" in body
    # arguments(): 6 steps of 2 samples at learning rate 1e-2, 16 samples = 0.75 epochs
    assert "- **Fine-tuning:** 6 of 6 optimizer steps, 0.75 epochs, learning rate 0.01, 2 samples per" in body
    assert "- **Criterion:** `taylor` during fine-tuning (first-order Taylor importance" in body
    assert 'PruningSchedule(kind="cubic", start_step=1, end_step=5, frequency=1, initial_sparsity=0.0)' in body
    assert 'PruningConfig.from_yaml("hf_prune_recipe.yaml")' in body and "hf-prune prune --model" not in body


def test_finalize_on_demand_equals_the_masked_model(tmp_path):
    model = FAMILIES["llama"].build()
    pruning = PruningCallback(PruningConfig(**TARGETS["llama"]), SCHEDULE, compact_at_end=False)
    _, before, _ = train(tmp_path, model, pruning)
    pruned = pruning.finalize(model, tmp_path / "on-demand")
    inputs = FAMILIES["llama"].inputs()
    torch.testing.assert_close(logits(pruned, inputs), before.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "on-demand"), inputs), before.logits, atol=1e-5, rtol=0)


def test_load_best_model_at_end_cuts_the_best_checkpoint_with_its_own_masks(tmp_path):
    pruning = PruningCallback(PruningConfig(mlp_neurons=0.5), SCHEDULE)
    before = MaskedLogitsAtEnd(FAMILIES["llama"].inputs())
    args = arguments(
        tmp_path,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps",
        save_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the worst: early
    )
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=args,
        train_dataset=dataset(),
        eval_dataset=dataset(4),
        callbacks=[before, pruning],
    )
    trainer.train()
    best = json.loads((Path(trainer.state.best_model_checkpoint) / STATE_FOLDER / "state.json").read_text())
    assert [p.to_dict() for p in pruning.plan.layers] == best["plan"]
    torch.testing.assert_close(logits(trainer.model, FAMILIES["llama"].inputs()), before.logits, atol=1e-5, rtol=0)


def test_resume_reproduces_masks_scores_and_weights_bit_for_bit(tmp_path):
    def run(output_dir, resume=None):
        pruning = PruningCallback(PruningConfig(**TARGETS["llama"]), SCHEDULE, compact_at_end=False)
        trainer, _, _ = train(
            output_dir, FAMILIES["llama"].build(), pruning, resume, save_strategy="steps", save_steps=3
        )
        return pruning, trainer.model

    whole, whole_model = run(tmp_path / "whole")
    assert (tmp_path / "whole" / "checkpoint-3" / STATE_FOLDER / "scores.safetensors").is_file()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    resumed, resumed_model = run(tmp_path / "resumed", resume=True)

    assert [p.to_dict() for p in resumed.plan.layers] == [p.to_dict() for p in whole.plan.layers]
    for name, value in whole._scores.state_dict().items():
        assert torch.equal(resumed._scores.state_dict()[name], value), name
    for (name, value), (_, other) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(value, other), name


def test_resume_from_elsewhere_needs_the_training_argument_and_says_so(tmp_path):
    pruning = PruningCallback(PruningConfig(mlp_neurons=0.5), SCHEDULE, compact_at_end=False)
    train(tmp_path / "first", FAMILIES["llama"].build(), pruning, save_strategy="steps", save_steps=3)
    checkpoint = str(tmp_path / "first" / "checkpoint-3")

    again = PruningCallback(PruningConfig(mlp_neurons=0.5), SCHEDULE, compact_at_end=False)
    with pytest.raises(CallbackStateError, match=r"set\s+TrainingArguments\(resume_from_checkpoint=<that folder>\)"):
        train(tmp_path / "second", FAMILIES["llama"].build(), again, checkpoint)
    again = PruningCallback(PruningConfig(mlp_neurons=0.5), SCHEDULE, compact_at_end=False)
    train(tmp_path / "third", FAMILIES["llama"].build(), again, checkpoint, resume_from_checkpoint=checkpoint)
    assert [p.to_dict() for p in again.plan.layers] == [p.to_dict() for p in pruning.plan.layers]

    different = PruningCallback(PruningConfig(mlp_neurons=0.25), SCHEDULE, compact_at_end=False)
    with pytest.raises(CallbackStateError, match=r"config is .* resume with the same callback arguments"):
        train(tmp_path / "fourth", FAMILIES["llama"].build(), different, checkpoint, resume_from_checkpoint=checkpoint)


def test_lora_masks_cover_base_weights_and_adapters_and_compaction_merges(tmp_path):
    base = FAMILIES["llama"].build()
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    model = get_peft_model(base, lora)
    config = PruningConfig(attention_heads=0.5, mlp_neurons=0.5, mlp_branches=1)
    pruning = PruningCallback(config, SCHEDULE)
    trainer, before, after = train(tmp_path, model, pruning)  # AfterEachStep checks W + s·B·A

    assert after.counts[-1]["mlp_branches"] == 1
    inputs = FAMILIES["llama"].inputs()
    pruned = pruning.pruned_model
    assert not any("lora" in name for name, _ in pruned.named_parameters())
    torch.testing.assert_close(logits(pruned, inputs), before.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(trainer.model, inputs), before.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "pruned"), inputs), before.logits, atol=1e-5, rtol=0)
    _, body = saved_card(tmp_path / "pruned")
    assert "- **Adapters:** the PEFT (LoRA) adapters were merged into the weights before the cut\n" in body


def test_gradient_accumulation_scores_the_optimizer_step(tmp_path):
    def run(output_dir, batch, accumulation):
        pruning = PruningCallback(PruningConfig(mlp_neurons=0.5, attention_heads=0.5), SCHEDULE, compact_at_end=False)
        train(
            output_dir,
            FAMILIES["llama"].build(),
            pruning,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            learning_rate=0.0,  # identical weights in both runs: only the batching differs
        )
        return pruning

    whole, accumulated = run(tmp_path / "a", 2, 1), run(tmp_path / "b", 1, 2)
    assert [p.to_dict() for p in accumulated.plan.layers] == [p.to_dict() for p in whole.plan.layers]
    for name, value in whole._scores.state_dict().items():
        torch.testing.assert_close(accumulated._scores.state_dict()[name], value, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    "schedule, score, error, message",
    [
        (
            PruningSchedule("cubic", start_step=0, end_step=3, initial_sparsity=0.5),
            "taylor",
            InvalidScheduleError,
            r"at step 0, before any training batch",
        ),
        (
            PruningSchedule(end_step=9),
            "taylor",
            InvalidScheduleError,
            r"end_step=9 is after the run's last optimizer step \(6\)",
        ),
    ],
)
def test_impossible_schedules_fail_at_train_start(tmp_path, schedule, score, error, message):
    pruning = PruningCallback(PruningConfig(mlp_neurons=0.5), schedule, score=score)
    with pytest.raises(error, match=message):
        train(tmp_path, FAMILIES["llama"].build(), pruning)


def test_oneshot_at_step_zero_with_a_weight_criterion_prunes_before_training(tmp_path):
    pruning = PruningCallback(
        PruningConfig(mlp_neurons=0.5, criterion="magnitude"),
        PruningSchedule("oneshot", start_step=0),
        score="criterion",
    )
    _, _, after = train(tmp_path, FAMILIES["llama"].build(), pruning, max_steps=2)
    assert after.counts[0]["mlp_neurons"] == 24


def test_bad_callback_arguments_are_refused():
    with pytest.raises(InvalidPruningTargetError, match="nothing to remove"):
        PruningCallback(PruningConfig())
    with pytest.raises(
        Exception, match=r"score='fisher' is unknown; choose one of taylor, movement, activation, criterion"
    ):
        PruningCallback(PruningConfig(mlp_neurons=0.5), score="fisher")


def test_torchrun_processes_take_identical_masks(tmp_path):
    """Two CPU processes (gloo) see different batches; summing the scores before each decision makes
    every process mask the same groups."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    job = Path(__file__).with_name("ddp_callback_job.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(job), str(tmp_path)]
    process = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, cwd=job.parent)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["world_size"] == 2
    assert first["pending"] != second["pending"]  # each process scored its own batches since the last event
    assert first["totals"] == second["totals"]
    assert first["plan"] == second["plan"]


def test_sparsity_target_prunes_gradually_to_the_one_shot_counts(tmp_path):
    config = PruningConfig(sparsity=0.3, criterion="magnitude")
    pruning = PruningCallback(config, PruningSchedule("cubic", start_step=0, end_step=2), score="criterion")
    _, _, after = train(tmp_path, FAMILIES["llama"].build(), pruning, max_steps=3)
    dense = FAMILIES["llama"].build()
    assert after.counts[-1] == final_counts(plan_for(dense, get_adapter(dense.config), config, RandomCriterion()))
    assert after.counts[-1]["mlp_neurons"] > 0


def test_non_uniform_allocations_are_refused_by_the_callback():
    with pytest.raises(InvalidPruningTargetError, match="gradual pruning keeps every layer the same shape"):
        PruningCallback(PruningConfig(mlp_neurons=0.5, allocation="global"))
