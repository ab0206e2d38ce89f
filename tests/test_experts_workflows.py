"""Routed experts wherever the dense kinds go (issue 16, item 5): the `PruningCallback` masking experts during
fine-tuning with a plain `transformers.Trainer`, `low_memory=True` reading checkpoints whose expert tensors
`from_pretrained` converts (per-expert weights on disk, fused 3-D tensors in the model), parameter and FLOPs
budgets, and per-expert module lists (a remote-code-style model, `list_moe.py`).

References are plain torch in the tests (`test_experts.py`'s: the family's own router with −∞ added to the
removed experts' logits, zeroed down-projection columns, deleted layers) or the in-memory prune."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers
from list_moe import ListMoeConfig
from safetensors.torch import load_file
from test_experts import COUNT_FIELDS, layers_of, reference, routers_exclude, tiny, weights_exclude
from tiny_models import calibration_windows
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_prune import HFPruner, PruningConfig, load_pruned
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.criteria import ScoringContext, get_criterion
from hf_prune.derivation.derive import DerivedAdapter, build_tiny
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.evaluation import flops_per_token
from hf_prune.groups import get_adapter
from hf_prune.plan import PruningPlan
from hf_prune.training.callback import PruningCallback
from hf_prune.training.gradual import final_counts
from hf_prune.training.masks import TrainingMasks
from hf_prune.training.schedule import PruningSchedule
from hf_prune.training.scores import TrainingScores

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULE = PruningSchedule("cubic", start_step=1, end_step=4, frequency=1)


def rows(count: int = 16, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 100, (count, length), generator=generator)]


def arguments(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
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
    return TrainingArguments(**{**settings, **overrides})


def plain_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


class RoutedOnlyToKept(TrainerCallback):
    """Watches every training forward of the experts modules: the experts the router chose must be kept by the
    callback's plan in force (plain torch: the indices the experts module is called with); records the plan's
    per-kind counts after every step."""

    def __init__(self, pruning: PruningCallback, model):
        self.pruning, self.chosen, self.counts = pruning, [], []
        experts = get_adapter(model.config).expert_layout.experts_module
        for index, layer in enumerate(layers_of(model)):
            layer.get_submodule(experts).register_forward_pre_hook(self._watch(index))

    def _watch(self, index):
        def hook(module, args):
            plan = self.pruning.plan
            if plan is not None and module.training:
                chosen = set(args[1].flatten().tolist())
                self.chosen.append(chosen)
                assert chosen <= set(plan.layers[index].experts), (index, chosen, plan.layers[index].experts)

        return hook

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.counts.append(final_counts(self.pruning.plan)["experts"])


class StateBeforeCut(TrainerCallback):
    """Registered before the PruningCallback: the trained weights just before the cut."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


#: (model type, score, amounts, experts masked after each of the 5 steps): the training scores on the gate
#: weights, and a data-free criterion that also ranks neurons inside the experts. The schedule is cubic from step
#: 1 to 4: round(n · (1 − (1 − t)³)) with t = 0, 1/3, 2/3, 1, 1.
CALLBACK_CASES = {
    "mixtral/taylor": ("mixtral", "taylor", {"experts": 2}, [0, 1, 2, 2, 2]),
    "qwen2_moe/activation": ("qwen2_moe", "activation", {"experts": 0.5}, [0, 1, 2, 2, 2]),
    "qwen2_moe/criterion+neurons": ("qwen2_moe", "criterion", {"experts": 1, "mlp_neurons": 0.25}, [0, 1, 1, 1, 1]),
}


@pytest.mark.parametrize("case", list(CALLBACK_CASES))
def test_callback_masks_experts_during_fine_tuning_and_cuts_them(tmp_path, case):
    """Masked experts are never routed to while training; the masks grow on the schedule; the cut model, and the
    saved folder reloaded with plain transformers, equal the trained dense weights run with the removed experts'
    router logits at −∞ and the removed neurons' down-projection columns zeroed (plain torch)."""
    model_type, score, amounts, counts = CALLBACK_CASES[case]
    model, inputs = tiny(model_type, seed=7)
    config = PruningConfig(**amounts, **({"criterion": "magnitude"} if score == "criterion" else {}))
    pruning = PruningCallback(config, SCHEDULE, score=score)
    before, watch = StateBeforeCut(), RoutedOnlyToKept(pruning, model)
    trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=rows(), callbacks=[before, pruning, watch])
    trainer.train()

    assert watch.counts == counts and watch.chosen
    dense, _ = tiny(model_type, seed=7)
    dense.load_state_dict(before.state)
    removed = {p.layer: sorted(set(range(4)) - set(p.experts)) for p in pruning.plan.layers}
    assert all(len(gone) == counts[-1] for gone in removed.values())
    expected_model = reference(dense, model_type, pruning.plan)
    with routers_exclude(expected_model, model_type, removed):
        expected = plain_logits(expected_model, inputs)

    assert pruning.report.output_format == "vanilla"
    assert getattr(trainer.model.config, COUNT_FIELDS[model_type]) == 4 - counts[-1]
    torch.testing.assert_close(plain_logits(trainer.model.eval(), inputs), expected, atol=1e-5, rtol=0)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")  # plain transformers
    torch.testing.assert_close(plain_logits(reloaded, inputs), expected, atol=1e-5, rtol=0)
    assert "routed experts" in (tmp_path / "pruned" / "README.md").read_text()


def test_training_masks_lift_the_router_hooks_for_the_teacher():
    """`TrainingMasks(keep_originals=True)` (distillation from the student's own base): masked, the routers never
    pick the removed experts (plain-torch −∞ reference); inside `unmasked()` the model is the dense one again."""
    dense, inputs = tiny("mixtral")
    adapter = get_adapter(dense.config)
    plan = PruningPlan.keep_all(dense, adapter)
    removed = {0: [1], 1: [0, 3], 2: [2]}
    for index, gone in removed.items():
        plan.layers[index].experts = tuple(e for e in range(4) if e not in gone)
    with routers_exclude(dense, "mixtral", removed):
        expected = plain_logits(dense, inputs)
    model = copy.deepcopy(dense)
    masks = TrainingMasks(adapter, plan, keep_originals=True)
    masks.apply(model)
    masks.apply(model)  # idempotent: one hook per router
    torch.testing.assert_close(plain_logits(model, inputs), expected, atol=1e-5, rtol=0)
    with masks.unmasked():
        torch.testing.assert_close(plain_logits(model, inputs), plain_logits(dense, inputs), atol=1e-6, rtol=0)
    torch.testing.assert_close(plain_logits(model, inputs), expected, atol=1e-5, rtol=0)
    masks.remove_hooks()
    torch.testing.assert_close(plain_logits(model, inputs), plain_logits(dense, inputs), atol=1e-6, rtol=0)


def plain_experts_forward(experts, scale: torch.Tensor):
    """Mixtral's experts in plain torch, expert j's output multiplied by `scale[j]` (1): `∂L/∂scale[j]` is
    `Σ g_j·f_j(x)·∂L/∂y` over the tokens routed to j."""

    def forward(hidden, top_k_index, top_k_weights):
        output = torch.zeros_like(hidden)
        for slot in range(top_k_index.shape[1]):
            for expert in range(scale.shape[0]):
                tokens = (top_k_index[:, slot] == expert).nonzero().flatten()
                gate, up = (hidden[tokens] @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
                out = (torch.nn.functional.silu(gate) * up) @ experts.down_proj[expert].T
                output = output.index_add(0, tokens, scale[expert] * top_k_weights[tokens, slot, None] * out)
        return output

    return forward


@pytest.mark.parametrize("score", ["taylor", "movement", "activation"])
def test_training_scores_of_experts_against_plain_torch(score):
    """One training step on Mixtral: `taylor` is |Σ g_j·∂L/∂g_j| per expert, `movement` its negative sum,
    `activation` (Σ g_j²)^½ over the tokens routed to j; the reference scales each expert's output by a
    parameter equal to 1 and reads its gradient (and recomputes the router's softmax, top-2, renormalisation)."""
    model, _ = tiny("mixtral")
    adapter = get_adapter(model.config)
    batch = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    scores = TrainingScores(model, adapter, ["experts"], score)
    model.train()
    model(input_ids=batch, labels=batch).loss.backward()
    scores.end_step()
    scores.synchronize(torch.device("cpu"))
    scores.remove_hooks()
    got = scores.scores(model, adapter, adapter.groups(layers_of(model)[0], 0, "experts"))

    plain = copy.deepcopy(model)
    plain.zero_grad()
    moe = layers_of(plain)[0].mlp
    scale = torch.ones(4, dtype=torch.float64, requires_grad=True)
    moe.experts.forward = plain_experts_forward(moe.experts, scale)
    captured = []
    moe.register_forward_pre_hook(lambda module, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    plain(input_ids=batch, labels=batch).loss.backward()
    probabilities = torch.softmax(captured[0] @ moe.gate.weight.T, dim=-1)
    top, chosen = probabilities.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    squares = torch.zeros(4, dtype=torch.float64).index_add_(0, chosen.flatten(), top.flatten().double().pow(2))
    expected = {"taylor": scale.grad.abs(), "movement": -scale.grad, "activation": squares.sqrt()}[score]
    torch.testing.assert_close(got, expected.detach(), atol=1e-7, rtol=1e-4)


def test_callback_refuses_what_cannot_read_neurons_inside_experts(tmp_path):
    """Training scores, L0 gates and the least-squares refit read one consuming projection per layer; experts
    have one per expert: typed errors naming the fix. L0 gates do not gate experts."""
    model, _ = tiny("mixtral")
    for score, repair, message in [
        ("taylor", "none", r"score='taylor' reads one consuming projection.*score='criterion'"),
        ("criterion", "lstsq", r"repair='lstsq' refits one consuming projection.*repair='none'"),
    ]:
        config = PruningConfig(experts=1, mlp_neurons=0.25, criterion="magnitude")
        pruning = PruningCallback(config, SCHEDULE, score=score, repair=repair)
        trainer = Trainer(model=model, args=arguments(tmp_path), train_dataset=rows(), callbacks=[pruning])
        with pytest.raises(InvalidPruningTargetError, match=message):
            trainer.train()
    with pytest.raises(InvalidPruningTargetError, match=r"score='l0' gates heads and MLP neurons only.*experts"):
        PruningCallback(PruningConfig(experts=1), SCHEDULE, score="l0").attach_gates(model)
    listed, _ = build_tiny(ListMoeConfig, seed=3)  # experts in a module list: their block applies the gates
    trainer = Trainer(
        model=listed,
        args=arguments(tmp_path),
        train_dataset=rows(),
        callbacks=[PruningCallback(PruningConfig(experts=1))],
    )
    with pytest.raises(InvalidPruningTargetError, match=r"per-expert module list.*score='criterion'"):
        trainer.train()


# ----------------------------------------------------------------------------------- low memory
LOW_MEMORY = {
    "calibration": calibration_windows(),
    "num_samples": 8,
    "seq_len": 16,
    "batch_size": 4,
    "reconstruct": "none",
    "experts": 1,
    "mlp_neurons": 0.25,
    "layers": 1,
    "criterion": {"experts": "reap", "neurons": "magnitude", "layers": "block_influence"},
}


def weights(folder) -> dict[str, torch.Tensor]:
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_low_memory_prunes_experts_as_in_memory(model_type, tmp_path):
    """Mixtral and Qwen2-MoE checkpoints hold one tensor per expert that `from_pretrained` stacks into the fused
    tensors (GPT-OSS holds the fused ones): layer by layer, REAP from the layer's own routing, the saved files equal
    the in-memory prune's tensor for tensor (same on-disk names), and the folder reloaded with plain transformers
    equals the plain-torch reference of the plan."""
    dense, inputs = tiny(model_type, seed=5)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    on_disk = set(weights(tmp_path / "dense"))
    assert any(".experts.0." in name for name in on_disk) == (model_type != "gpt_oss")
    in_memory = HFPruner.from_pretrained(tmp_path / "dense")
    in_memory.prune(**LOW_MEMORY)
    want = weights(in_memory.save_pretrained(tmp_path / "in_memory"))
    layered = HFPruner.from_pretrained(tmp_path / "dense", low_memory=True)
    layered.prune(**LOW_MEMORY)
    assert all(p.device.type == "meta" for p in layered.model.parameters())
    assert layered.plan.to_dict() == in_memory.plan.to_dict()
    assert layered.report.output_format == in_memory.report.output_format == "vanilla"
    got = weights(layered.save_pretrained(tmp_path / "low_memory"))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)

    plan = layered.plan
    kept_layers = [layer_plan for layer_plan in plan.layers if layer_plan.keep_layer]
    removed = {position: sorted(set(range(4)) - set(p.experts)) for position, p in enumerate(kept_layers)}
    expected_model = reference(dense, model_type, plan)
    with routers_exclude(expected_model, model_type, removed):
        expected = plain_logits(expected_model, inputs)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "low_memory")
    assert getattr(reloaded.config, COUNT_FIELDS[model_type]) == 3
    torch.testing.assert_close(plain_logits(reloaded, inputs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_logits(layered.load_model(), inputs), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain_logits(load_pruned(tmp_path / "in_memory"), inputs), expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- budgets
def mixtral_flops(model, context: int) -> int:
    """FLOPs per token of a Mixtral in plain torch: 2 per weight of every Linear (router included), of the
    top-2 experts' slices, and attention over `context` tokens."""
    config = model.config
    macs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for layer in layers_of(model):
        experts = layer.mlp.experts
        macs += config.num_experts_per_tok * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel())
        macs += 2 * layer.self_attn.o_proj.in_features * context
    return 2 * macs


def test_budgets_are_spread_over_experts_heads_and_neurons():
    """`target_params` on Mixtral removes the same number of experts from every layer (a parameter budget's share
    of them), then heads and neurons, and lands at most one rounding step (8 neurons of every expert left, in every
    layer) under the target; `target_flops` removes no experts (a token runs two whichever stay) and lands under
    its target. Parameters and FLOPs are counted in plain torch; the cut equals the masked reference."""
    dense, inputs = tiny("mixtral")
    parameters = sum(p.numel() for p in dense.parameters())
    target = int(0.8 * parameters)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(target_params=target, criterion="magnitude", reconstruct="none")
    after = sum(p.numel() for p in pruner.model.parameters())
    step = 3 * 8 * 3 * dense.config.hidden_size * pruner.model.config.num_local_experts  # 8 neurons, 3 layers
    assert target - step < after <= target
    kept = {len(p.experts) for p in pruner.plan.layers}
    assert kept == {pruner.model.config.num_local_experts} and kept.pop() < 4
    removed = {p.layer: sorted(set(range(4)) - set(p.experts)) for p in pruner.plan.layers}
    expected_model = reference(dense, "mixtral", pruner.plan)
    with routers_exclude(expected_model, "mixtral", removed):
        expected = plain_logits(expected_model, inputs)
    torch.testing.assert_close(plain_logits(pruner.model, inputs), expected, atol=1e-5, rtol=0)

    flops = mixtral_flops(dense, 16)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(target_flops=int(0.85 * flops), seq_len=16, criterion="magnitude", reconstruct="none")
    assert pruner.model.config.num_local_experts == 4
    assert 0.75 * flops < mixtral_flops(pruner.model, 16) <= 0.85 * flops


def test_budgets_with_a_cross_layer_allocation_are_refused_on_moe_models():
    model, _ = tiny("mixtral")
    message = r"sparsity=0.2 with allocation='global'.*allocation='uniform'"
    with pytest.raises(InvalidPruningTargetError, match=message):
        HFPruner(model).prune(sparsity=0.2, allocation="global", criterion="magnitude", reconstruct="none")


# ----------------------------------------------------------------------------------- per-expert module lists
def list_moe_reference(dense, plan) -> tuple[nn.Module, dict[int, list[int]]]:
    """The list-MoE model with the plan's removals in plain torch: every expert's `w2` columns of the removed
    neurons zeroed, removed layers deleted; and the experts each kept layer's router must never pick."""
    model = copy.deepcopy(dense)
    with torch.no_grad():
        for layer_plan in plan.layers:
            for expert in layers_of(model)[layer_plan.layer].mlp.experts:
                for neuron in set(range(expert.w2.in_features)) - set(layer_plan.neurons):
                    expert.w2.weight[:, neuron] = 0
    kept = [p for p in plan.layers if p.keep_layer]
    model.model.layers = nn.ModuleList(layers_of(model)[p.layer] for p in kept)
    for position, layer in enumerate(layers_of(model)):
        layer.self_attn.layer_idx = position
    model.config.num_hidden_layers = len(kept)
    removed = {position: sorted(set(range(4)) - set(p.experts)) for position, p in enumerate(kept)}
    return model, removed


@contextlib.contextmanager
def gates_exclude(model, removed: dict[int, list[int]]):
    """Inside: the router `gate` of every layer in `removed` gives those experts the logit −∞ (plain torch)."""
    with weights_exclude({id(layers_of(model)[index].mlp.gate.weight): experts for index, experts in removed.items()}):
        yield


def test_per_expert_module_lists_are_derived_cut_and_reloaded(tmp_path):
    """A remote-code-style MoE whose experts are an `nn.ModuleList` of MLPs (`list_moe.py`): the router width is
    the number of entries, removing an expert drops its entry and router row, `num_local_experts` and
    `intermediate_size` are updated; the cut model and the vanilla folder reloaded with `AutoModelForCausalLM`
    equal the plain-torch reference (router logit −∞, zeroed `w2` columns, deleted layer)."""
    dense, inputs = build_tiny(ListMoeConfig, seed=3)
    adapter = get_adapter(dense.config)
    assert isinstance(adapter, DerivedAdapter) and {"experts", "neurons", "layers"} <= adapter.kinds
    layout = adapter.expert_layout
    assert layout.per_expert and layout.router == "mlp.gate" and layout.experts_module == "mlp.experts"
    assert (layout.count_field, layout.width_field) == ("num_local_experts", "intermediate_size")
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(
        experts=1,
        mlp_neurons=0.25,
        layers=1,
        criterion={"experts": "frequency", "neurons": "magnitude", "layers": "block_influence"},
        calibration=calibration_windows(),
        num_samples=8,
        seq_len=16,
        reconstruct="none",
    )
    model, removed = list_moe_reference(dense, pruner.plan)
    with gates_exclude(model, removed):
        expected = plain_logits(model, inputs)
    assert (expected - plain_logits(model, inputs)).abs().max() > 1e-4  # the removed experts matter here
    torch.testing.assert_close(plain_logits(pruner.model, inputs), expected, atol=1e-5, rtol=0)
    config = pruner.model.config
    assert (config.num_local_experts, config.intermediate_size, config.num_hidden_layers) == (3, 32, 2)
    for layer in layers_of(pruner.model):
        assert len(layer.mlp.experts) == layer.mlp.num_experts == 3 and layer.mlp.gate.weight.shape[0] == 3
        assert all(expert.w2.in_features == 32 for expert in layer.mlp.experts)
    assert pruner.report.output_format == "vanilla"
    pruner.save_pretrained(tmp_path / "pruned")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    torch.testing.assert_close(plain_logits(reloaded, inputs), expected, atol=1e-5, rtol=0)
    # FLOPs per token: every Linear once, but a token runs 2 of the experts (plain torch count)
    linears = sum(m.weight.numel() for m in pruner.model.modules() if isinstance(m, nn.Linear))
    for layer in layers_of(pruner.model):
        expert = sum(m.weight.numel() for m in layer.mlp.experts[0].modules() if isinstance(m, nn.Linear))
        linears -= (len(layer.mlp.experts) - 2) * expert
        linears += 2 * layer.self_attn.o_proj.in_features * 16
    assert flops_per_token(pruner.model, 16) == 2 * linears


def test_per_expert_module_lists_route_frequency_and_refuse_gate_weights():
    """`frequency` counts the tokens each entry is called on (plain torch: softmax, top-2 of the router on the
    block's inputs); `gate_weight` and `reap` read gate weights that a list's block applies out of sight: typed
    errors naming `frequency`."""
    model, _ = build_tiny(ListMoeConfig, seed=3)
    adapter = get_adapter(model.config)
    windows = calibration_windows(count=4, length=8)
    stats = collect_statistics(model, adapter, windows, {"routing"})
    captured = []
    moe = layers_of(model)[0].mlp
    handle = moe.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model.model(torch.cat(windows))
    handle.remove()
    chosen = torch.softmax(captured[0] @ moe.gate.weight.T, dim=-1).topk(2, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=4).double()
    groups = adapter.groups(layers_of(model)[0], 0, "experts")
    scores = get_criterion("frequency").score(ScoringContext(model, adapter, stats), groups)
    torch.testing.assert_close(scores.double(), counts / captured[0].shape[0])
    for criterion in ("gate_weight", "reap"):
        with pytest.raises(InvalidPruningTargetError, match=r"per-expert module list.*'frequency'"):
            HFPruner(copy.deepcopy(model)).prune(
                experts=1, criterion={"experts": criterion}, calibration=windows, num_samples=4, seq_len=8
            )
