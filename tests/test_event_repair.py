"""`PruningCallback(repair="lstsq")`: least-squares repair of the consumers at every pruning event, on tiny
models and tiny `Trainer` runs. The cut model equals the masked one after every event; the refit equals a
plain-torch ridge least squares on the consumer inputs the training batches produced, and lowers the
consumer's output error on held-out batches; gradient accumulation and resume refit alike; refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_callback import TARGETS, arguments, dataset, logits
from tiny_models import FAMILIES, VOCAB
from transformers import Trainer, TrainerCallback

from hf_prune import PruningCallback, PruningConfig
from hf_prune.errors import UsageError
from hf_prune.pruner import HFPruner
from hf_prune.training.callback import STATE_FOLDER
from hf_prune.training.distillation import frozen_copy
from hf_prune.training.schedule import PruningSchedule

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = PruningSchedule("cubic", start_step=1, end_step=4, frequency=1)
HEAD_DIM = 16  # tiny llama: 6 query heads of 16 dims in 3 KV groups, 48 MLP neurons


class CutEqualsMaskedAtEvents(TrainerCallback):
    """After the PruningCallback: at every event, a hook-free copy cut with the current plan computes what
    the masked model computes."""

    def __init__(self, pruning: PruningCallback, config: PruningConfig):
        self.pruning, self.config = pruning, config
        self.checked: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step not in self.pruning._events:
            return
        inputs = FAMILIES["llama"].inputs()
        masked = logits(model, inputs)
        model.train()
        copy = frozen_copy(model)
        pruner = HFPruner(copy)
        pruner.apply(self.pruning.plan, self.config)
        torch.testing.assert_close(logits(pruner.model, inputs), masked, atol=1e-5, rtol=0)
        self.checked.append(state.global_step)


@pytest.mark.parametrize("bf16", [False, True])
def test_cut_equals_masked_after_every_event_with_repair(tmp_path, bf16):
    config = PruningConfig(**TARGETS["llama"])
    pruning = PruningCallback(config, SCHEDULE, repair="lstsq", pruned_dir=None)
    check = CutEqualsMaskedAtEvents(pruning, config)
    before = MaskedLogits()
    trainer = Trainer(
        model=FAMILIES["llama"].build(),
        args=arguments(tmp_path, max_steps=5, bf16=bf16),  # bf16: the Grams come from bf16 autocast inputs
        train_dataset=dataset(),
        callbacks=[before, pruning, check],
    )
    trainer.train()
    assert check.checked == [1, 2, 3, 4]
    assert pruning._repair is None  # hooks gone after the last event
    torch.testing.assert_close(logits(trainer.model, FAMILIES["llama"].inputs()), before.logits, atol=1e-5, rtol=0)


class MaskedLogits(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.logits = logits(model, FAMILIES["llama"].inputs())


def consumers(model):
    """(layer, branch) → the consumer module of the tiny llama."""
    found = {}
    for index, layer in enumerate(model.model.layers):
        found[(index, "attention")] = layer.self_attn.o_proj
        found[(index, "mlp")] = layer.mlp.down_proj
    return found


def removed_columns(layer_plan, branch: str) -> list[int]:
    """The consumer's input columns a layer plan removes, from the plan's index lists (plain Python)."""
    if branch == "mlp":
        return sorted(set(range(48)) - set(layer_plan.neurons))
    return [h * HEAD_DIM + d for h in sorted(set(range(6)) - set(layer_plan.query_heads)) for d in range(HEAD_DIM)]


class BeforeEvent(TrainerCallback):
    """Before the PruningCallback: every consumer input of the training forwards, and at the event the
    consumer weights (earlier masks applied) and their inputs on held-out batches."""

    def __init__(self, pruning: PruningCallback, event: int, held_out: torch.Tensor):
        self.pruning, self.event, self.held_out = pruning, event, held_out
        self.inputs: dict[tuple, list[torch.Tensor]] = {}
        self.held_out_inputs: dict[tuple, torch.Tensor] = {}
        self.weights: dict[tuple, torch.Tensor] = {}
        self.previous = None
        self._handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for key, module in consumers(model).items():

            def keep(module, inputs, key=key):
                if module.training and torch.is_grad_enabled():
                    self.inputs.setdefault(key, []).append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))
                elif not torch.is_grad_enabled() and not module.training:
                    self.held_out_inputs[key] = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

            self._handles.append(module.register_forward_pre_hook(keep))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step != self.event:
            return
        self.previous = self.pruning.plan
        for key, module in consumers(model).items():
            weight = module.weight.detach().double().clone()
            weight[:, removed_columns(self.previous.layers[key[0]], key[1])] = 0
            self.weights[key] = weight
        logits(model, {"input_ids": self.held_out})
        model.train()
        for handle in self._handles:
            handle.remove()


class AfterEvent(TrainerCallback):
    def __init__(self, event: int):
        self.event = event
        self.weights = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.event:
            self.weights = {key: m.weight.detach().double().clone() for key, m in consumers(model).items()}


def redundant_llama():
    """The tiny llama with MLP neurons in near-duplicate pairs (n, n + 24): a random MLP's neurons carry
    independent information, which no refit can recover; a trained one's overlap, which the refit uses."""
    model = FAMILIES["llama"].build()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for projection in (layer.mlp.gate_proj, layer.mlp.up_proj):
                first = projection.weight[:24]
                noise = torch.randn(first.shape, generator=generator)
                projection.weight[24:] = first + 0.05 * first.std() * noise
    return model


def run_with_probes(tmp_path, repair: str, event: int = 3, **overrides):
    pruning = PruningCallback(
        PruningConfig(kv_groups=1, mlp_neurons=0.5),
        PruningSchedule("oneshot", start_step=event),
        repair=repair,
        compact_at_end=False,
    )
    held_out = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(7))
    before, after = BeforeEvent(pruning, event, held_out), AfterEvent(event)
    settings = {"max_steps": event + 1, "per_device_train_batch_size": 8, "learning_rate": 1e-3, **overrides}
    trainer = Trainer(
        model=redundant_llama(),
        args=arguments(tmp_path, **settings),
        train_dataset=dataset(count=40, length=32),
        callbacks=[before, pruning, after],
    )
    trainer.train()
    return pruning, before, after


def test_the_refit_is_ridge_least_squares_on_the_training_inputs_and_lowers_held_out_error(tmp_path):
    pruning, before, after = run_with_probes(tmp_path, "lstsq")
    plan = pruning.plan
    for key, collected in before.inputs.items():
        layer_plan = plan.layers[key[0]]
        removed = removed_columns(layer_plan, key[1])
        assert removed, key  # every layer loses a KV group and half its neurons
        kept = [c for c in range(collected[0].shape[1]) if c not in set(removed)]
        x = torch.cat(collected).double()  # every training token since the start (the event is the first)
        assert x.shape[0] == 3 * 8 * 32
        w0, w1 = before.weights[key], after.weights[key]
        gram = x.T @ x / x.shape[0]
        normal = gram[kept][:, kept]
        normal = normal + 1e-4 * normal.diagonal().mean() * torch.eye(len(kept), dtype=torch.float64)
        expected = torch.linalg.solve(normal, gram[kept] @ w0.T).T
        # Near-collinear inputs (GQA heads sharing a value head, the near-duplicate neurons: condition up to ~1e5)
        # let the float32 Gram blocks move the weights by up to ~1e-3 relative; what least squares pins down
        # is the consumer's output on those tokens.
        outputs = x[:, kept] @ expected.T
        assert (x[:, kept] @ w1[:, kept].T - outputs).norm() < 1e-4 * outputs.norm(), key
        assert (w1[:, kept] - expected).norm() < 1e-2 * expected.norm(), key
        assert torch.count_nonzero(w1[:, removed]) == 0

        held = before.held_out_inputs[key].double()
        target = held @ w0.T
        refit_error = (held @ w1.T - target).pow(2).sum()
        masked_error = (held[:, kept] @ w0[:, kept].T - target).pow(2).sum()
        assert refit_error < 0.9 * masked_error, (key, float(refit_error), float(masked_error))


def test_without_repair_the_kept_columns_are_left_alone(tmp_path):
    _, before, after = run_with_probes(tmp_path, "none")
    for key, w0 in before.weights.items():
        nonzero = after.weights[key].abs().sum(0) > 0
        torch.testing.assert_close(after.weights[key][:, nonzero], w0[:, nonzero], rtol=0, atol=0)


def test_gradient_accumulation_refits_alike(tmp_path):
    whole = run_with_probes(tmp_path / "a", "lstsq", learning_rate=0.0)[2]
    accumulated = run_with_probes(
        tmp_path / "b", "lstsq", learning_rate=0.0, per_device_train_batch_size=4, gradient_accumulation_steps=2
    )[2]
    for key, weight in whole.weights.items():
        # The same tokens in other float32 sums: near-collinear inputs move the weights by ~1e-4 relative.
        assert (accumulated.weights[key] - weight).norm() < 1e-3 * weight.norm(), key
        assert torch.equal(accumulated.weights[key] == 0, weight == 0), key  # the same masks


def test_resume_between_events_refits_as_an_uninterrupted_run(tmp_path):
    def run(output_dir, resume=None):
        pruning = PruningCallback(PruningConfig(**TARGETS["llama"]), SCHEDULE, repair="lstsq", compact_at_end=False)
        trainer = Trainer(
            model=FAMILIES["llama"].build(),
            args=arguments(output_dir, max_steps=5, save_strategy="steps", save_steps=2),
            train_dataset=dataset(),
            callbacks=[pruning],
        )
        trainer.train(resume_from_checkpoint=resume)
        return pruning, trainer.model

    whole, whole_model = run(tmp_path / "whole")
    saved = tmp_path / "whole" / "checkpoint-2" / STATE_FOLDER / "repair.safetensors"
    assert saved.is_file()
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    resumed, resumed_model = run(tmp_path / "resumed", resume=True)
    assert [p.to_dict() for p in resumed.plan.layers] == [p.to_dict() for p in whole.plan.layers]
    for (name, value), (_, other) in zip(whole_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(value, other), name


def test_repair_refusals_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match=r"repair='ridge' is unknown; choose one of 'none', 'lstsq'"):
        PruningCallback(PruningConfig(mlp_neurons=0.5), repair="ridge")
    with pytest.raises(UsageError, match=r"use repair='none' with score='l0'"):
        PruningCallback(PruningConfig(mlp_neurons=0.5), score="l0", repair="lstsq")
    model = get_peft_model(FAMILIES["llama"].build(), LoraConfig(r=4, target_modules=["down_proj"]))
    pruning = PruningCallback(PruningConfig(mlp_neurons=0.5), SCHEDULE, repair="lstsq")
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=dataset(), callbacks=[pruning])
    with pytest.raises(UsageError, match=r"or use repair='none' with LoRA"):
        trainer.train()


def test_torchrun_processes_refit_alike(tmp_path):
    """Two CPU processes (gloo) see different batches; the Gram sums are added across processes before each
    refit, so both refit to the same weights (local Grams would make the replicas drift apart)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    job = Path(__file__).with_name("ddp_callback_job.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(job), str(tmp_path)]
    process = subprocess.run(
        [*command, "repair"], capture_output=True, text=True, timeout=300, env=environment, cwd=job.parent
    )
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1))
    assert first["world_size"] == 2 and first["plan"] == second["plan"]
    for ours, theirs in zip(first["consumers"], second["consumers"]):  # (o_proj, down_proj) per layer
        for a, b in zip(ours, theirs):
            assert torch.equal(torch.tensor(a), torch.tensor(b))
