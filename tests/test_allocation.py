"""Allocations (`uniform`, `global`, `adaptive`), budget targets, protected layers and `round_to`."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import FAMILIES, STRUCTURAL

from hf_prune import HFPruner, PruningConfig, load_pruned
from hf_prune.allocation import resolve_counts
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.evaluation import flops_per_token, parameter_count
from hf_prune.groups import get_adapter
from hf_prune.masking import apply_masks


def prune(family: str, **settings) -> tuple[HFPruner, torch.nn.Module]:
    dense = FAMILIES[family].build()
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(PruningConfig(**{**STRUCTURAL, **settings}))
    return pruner, dense


def prunable_parameters(model) -> int:
    adapter = get_adapter(model.config)
    targets = resolve_counts(model, adapter, PruningConfig(mlp_neurons=1))
    return int(sum(costs.prunable for costs in targets.budget.costs.values()))


def widths(pruner: HFPruner) -> list[tuple[int, int]]:
    return [(len(p.query_heads), len(p.neurons)) for p in pruner.plan.layers]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_uniform_sparsity_removes_its_share_of_prunable_parameters_and_stays_vanilla(family):
    pruner, dense = prune(family, sparsity=0.3)
    removed = parameter_count(dense) - parameter_count(pruner.model)
    share = removed / prunable_parameters(dense)
    assert abs(share - 0.3) < 0.03, share
    assert len(set(widths(pruner))) == 1  # the same shape in every layer
    if family == "llama":  # BERT's config derives head_dim from hidden_size: fewer heads need the loader format
        assert pruner.report.output_format == "vanilla"


@pytest.mark.parametrize("allocation", ["global", "adaptive"])
@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_non_uniform_allocations_spend_the_uniform_budget_and_cut_exactly(family, allocation, tmp_path):
    uniform, dense = prune(family, sparsity=0.3)
    pruner, _ = prune(family, sparsity=0.3, allocation=allocation)
    budget = parameter_count(dense) - parameter_count(uniform.model)
    removed = parameter_count(dense) - parameter_count(pruner.model)
    largest_unit = max(
        c.kv_group for c in resolve_counts(dense, pruner.adapter, PruningConfig(sparsity=0.3)).budget.costs.values()
    )
    assert abs(removed - budget) <= largest_unit
    assert len(set(widths(pruner))) > 1  # redistributed over layers

    masked = copy.deepcopy(dense)
    apply_masks(masked, pruner.adapter, pruner.plan)
    inputs = FAMILIES[family].inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(**inputs).logits, masked(**inputs).logits, atol=1e-5, rtol=0)
    pruner.save_pretrained(tmp_path / "model")
    with torch.no_grad():
        reloaded = load_pruned(tmp_path / "model")(**inputs).logits
    torch.testing.assert_close(reloaded, masked(**inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("allocation", ["global", "adaptive"])
def test_query_heads_alone_in_a_gqa_model_need_no_kv_group_scores(allocation):
    """`attention_heads` without `kv_groups` on a GQA model: every KV group stays (nothing to score for them,
    and no `kv_groups` criterion is configured), and as many query heads go as the uniform allocation takes."""
    uniform, _ = prune("llama", attention_heads=1)
    pruner, _ = prune("llama", attention_heads=1, allocation=allocation)
    assert all(p.kv_heads == u.kv_heads for p, u in zip(pruner.plan.layers, uniform.plan.layers, strict=True))
    assert sum(len(p.query_heads) for p in pruner.plan.layers) == sum(len(p.query_heads) for p in uniform.plan.layers)


def test_global_takes_neurons_from_the_layer_whose_scores_are_skewed():
    """Layer 1 has half its neurons zeroed: after per-layer normalisation those rank lowest
    model-wide, so `global` takes them all there, where `uniform` cannot."""
    dense = FAMILIES["llama"].build()
    width = dense.config.intermediate_size
    mlp = dense.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[: width // 2] = 0
        mlp.up_proj.weight[: width // 2] = 0
        mlp.down_proj.weight[:, : width // 2] = 0
    layers = dense.config.num_hidden_layers
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(PruningConfig(mlp_neurons=width // (2 * layers), allocation="global", **STRUCTURAL))
    removed = {p.layer: width - len(p.neurons) for p in pruner.plan.layers}
    assert removed[1] == width // 2 and sum(removed.values()) == width // 2
    assert set(pruner.plan.layers[1].neurons) == set(range(width // 2, width))


def test_adaptive_moves_budget_between_heads_and_neurons():
    """Every head weighs the same (z-score 0) while three quarters of the neurons are zeroed (z-score < 0): the
    joint ranking spends the whole budget on those neurons, where `uniform` takes heads too."""
    dense = FAMILIES["bert"].build()
    width = dense.config.intermediate_size
    zeroed = 3 * width // 4  # enough to cover the whole budget
    with torch.no_grad():
        for layer in dense.bert.encoder.layer:
            for projection in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
                projection.weight.fill_(0.1)
                projection.bias.fill_(0.1)
            layer.attention.output.dense.weight.fill_(0.1)
            for parameter in (layer.intermediate.dense.weight, layer.intermediate.dense.bias):
                parameter[:zeroed] = 0
            layer.output.dense.weight[:, :zeroed] = 0
    uniform = HFPruner(copy.deepcopy(dense))
    uniform.prune(PruningConfig(sparsity=0.2, **STRUCTURAL))
    assert any(len(p.query_heads) < dense.config.num_attention_heads for p in uniform.plan.layers)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(PruningConfig(sparsity=0.2, allocation="adaptive", **STRUCTURAL))
    assert all(len(p.query_heads) == dense.config.num_attention_heads for p in pruner.plan.layers)
    assert all(set(range(zeroed, width)) <= set(p.neurons) for p in pruner.plan.layers)


def test_protected_layers_keep_everything_and_negative_indices_count_from_the_end():
    pruner, dense = prune("llama", mlp_neurons=0.5, kv_groups=1, layers=1, protected_layers=(0, -1))
    last = dense.config.num_hidden_layers - 1
    first, final = pruner.plan.layers[0], pruner.plan.layers[last]
    assert first.keep_layer and final.keep_layer
    assert (
        len(first.neurons) == dense.config.intermediate_size
        and len(final.query_heads) == dense.config.num_attention_heads
    )
    assert not all(p.keep_layer for p in pruner.plan.layers[1:last])
    assert pruner.report.output_format == "loader"


def test_round_to_keeps_a_multiple_of_neurons():
    for allocation in ("uniform", "global"):
        pruner, _ = prune("llama", mlp_neurons=0.3, round_to=8, allocation=allocation)
        assert all(len(p.neurons) % 8 == 0 for p in pruner.plan.layers)
        assert any(len(p.neurons) < FAMILIES["llama"].build().config.intermediate_size for p in pruner.plan.layers)


def test_parameter_and_flop_targets_are_met_within_one_unit():
    pruner, dense = prune("llama", target_params=parameter_count(FAMILIES["llama"].build()) * 9 // 10)
    target = parameter_count(dense) * 9 // 10
    neuron = 3 * dense.config.hidden_size
    assert abs(parameter_count(pruner.model) - target) <= neuron * dense.config.num_hidden_layers

    flops = flops_per_token(dense, context=64)
    pruner, _ = prune("llama", target_flops=int(flops * 0.7), seq_len=64)
    assert abs(flops_per_token(pruner.model, context=64) / flops - 0.7) < 0.02


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"sparsity": 0.2, "mlp_neurons": 0.5}, r"sparsity sets the whole budget .* drop mlp_neurons"),
        ({"sparsity": 0.2, "target_params": 10}, r"sparsity and target_params are alternatives"),
        ({"sparsity": 1.5}, r"sparsity=1.5 is a fraction of the prunable parameters"),
        ({"target_params": 10**9}, r"target_params=1,000,000,000 is not below the model's present"),
        ({"sparsity": 0.99}, r"sparsity=0.99 asks to remove .* allows only"),
        (
            {"kv_groups": 1, "attention_heads": 1, "allocation": "adaptive"},
            r"set kv_groups or attention_heads, not both",
        ),
        (
            {"mlp_neurons": 0.5, "protected_layers": (7,)},
            r"protected_layers=\(7,\): layer 7 does not exist; the model has 4",
        ),
        ({"layers": 3, "protected_layers": (0, 1)}, r"layers=3 removes 3, but only 2 are outside protected_layers"),
        ({"mlp_neurons": 0.1, "round_to": 64}, r"round_to=64 keeps all 48 neurons"),
        ({"mlp_neurons": 0.5, "round_to": 0}, r"round_to=0 must be a positive int"),
    ],
)
def test_bad_budget_and_allocation_settings_are_refused_before_any_work(settings, message):
    model = FAMILIES["llama"].build()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InvalidPruningTargetError, match=message):
        HFPruner(model).prune(**settings, **STRUCTURAL)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
