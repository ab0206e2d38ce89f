"""Mixture-of-experts models (issue 16): experts found generically, cut == an independent reference, vanilla
checkpoints that plain transformers reloads, routing criteria from the calibration pass.

The reference is plain torch in this file: a removed expert gets the router logit −∞ (the family's own router
code runs with `torch.nn.functional.linear` wrapped to add −∞ to the removed experts' columns), a removed
neuron has its down-projection column zeroed in every expert, a removed layer is deleted from the layer list,
a removed query head has its `o_proj` input columns zeroed.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import calibration_windows
from torch import nn

from hf_prune import HFPruner, PruningConfig, load_pruned
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.cli import main
from hf_prune.derivation.derive import DerivedAdapter, build_tiny
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.evaluation import flops_per_token
from hf_prune.groups import get_adapter
from hf_prune.masking import apply_masks
from hf_prune.plan import PruningPlan
from hf_prune.surgery import apply_plan

RELOAD_SCRIPT = Path(__file__).with_name("reload_checkpoints.py")
#: model type → (config class, router module, down projection's width dimension) as the modeling files have them.
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, "mlp.gate", 2),
    "qwen2_moe": (transformers.Qwen2MoeConfig, "mlp.gate", 2),
    "qwen3_moe": (transformers.Qwen3MoeConfig, "mlp.gate", 2),
    "olmoe": (transformers.OlmoeConfig, "mlp.gate", 2),
    "granitemoe": (transformers.GraniteMoeConfig, "block_sparse_moe.router", 2),
    "gpt_oss": (transformers.GptOssConfig, "mlp.router", 1),
}
#: The count field of each family's config (the modeling files read these).
COUNT_FIELDS = {
    "mixtral": "num_local_experts",
    "qwen2_moe": "num_experts",
    "qwen3_moe": "num_experts",
    "olmoe": "num_experts",
    "granitemoe": "num_local_experts",
    "gpt_oss": "num_local_experts",
}


def tiny(model_type: str, seed: int = 3):
    model, inputs = build_tiny(FAMILIES[model_type][0], seed=seed)
    return model.eval(), inputs


def layers_of(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


@contextlib.contextmanager
def weights_exclude(masks: dict[int, list[int]]):
    """Inside: every `F.linear` with a weight whose id is in `masks` gives those output columns −∞ (plain torch)."""
    linear = torch.nn.functional.linear

    def patched(x, weight, bias=None):
        out = linear(x, weight, bias)
        if id(weight) in masks:
            out = out.clone()
            out[..., masks[id(weight)]] = float("-inf")
        return out

    with mock.patch("torch.nn.functional.linear", patched):
        yield


@contextlib.contextmanager
def routers_exclude(model: nn.Module, model_type: str, removed: dict[int, list[int]]):
    """Inside: every router of a layer in `removed` gives those experts the logit −∞ (plain torch)."""
    router = FAMILIES[model_type][1]
    masks = {id(layers_of(model)[index].get_submodule(router).weight): experts for index, experts in removed.items()}
    with weights_exclude(masks):
        yield


def logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_experts_found_without_a_family_table(model_type):
    model, _ = tiny(model_type)
    adapter = get_adapter(model.config)
    assert isinstance(adapter, DerivedAdapter)
    assert {"experts", "neurons", "layers"} <= adapter.kinds, adapter.refused
    layout = adapter.expert_layout
    assert layout.router == FAMILIES[model_type][1]
    field = COUNT_FIELDS[model_type]
    assert layout.count_field in (field, type(model.config).attribute_map.get(field))
    layer = layers_of(model)[0]
    assert adapter.geometry(layer).experts == getattr(model.config, COUNT_FIELDS[model_type]) == 4
    if model_type == "qwen2_moe":  # the shared expert is a dense MLP beside the router, never a routed expert
        names = {piece.parameter for group in adapter.groups(layer, 0, "experts") for piece in group.slices}
        assert not any("shared" in name for name in names)


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_cut_experts_equal_router_minus_infinity(model_type):
    """Different experts removed per layer: the cut model, and hf_prune's masking, equal the family's own forward
    with the removed experts' router logits at −∞ (before top-k and renormalisation)."""
    dense, inputs = tiny(model_type)
    adapter = get_adapter(dense.config)
    removed = {0: [1], 1: [0, 2]}
    plan = PruningPlan.keep_all(dense, adapter)
    for index, gone in removed.items():
        plan.layers[index].experts = tuple(e for e in range(4) if e not in gone)
    with routers_exclude(dense, model_type, removed):
        expected = logits(dense, inputs)
    assert (expected - logits(dense, inputs)).abs().max() > 1e-4  # the removal matters on these inputs

    masked = copy.deepcopy(dense)
    handles = apply_masks(masked, adapter, plan)
    torch.testing.assert_close(logits(masked, inputs), expected, atol=1e-5, rtol=0)
    for handle in handles:
        handle.remove()

    cut = copy.deepcopy(dense)
    before = sum(p.numel() for p in cut.parameters())
    apply_plan(cut, adapter, plan)
    torch.testing.assert_close(logits(cut, inputs), expected, atol=1e-5, rtol=0)
    router = FAMILIES[model_type][1]
    hidden = dense.config.hidden_size
    layer = layers_of(dense)[0]
    router_bias = "bias" in dict(layer.get_submodule(router).named_parameters())
    per_expert = sum(p[0].numel() for name, p in layer.named_parameters() if ".experts." in f".{name}")
    per_expert += hidden + router_bias
    assert before - sum(p.numel() for p in cut.parameters()) == pytest.approx(3 * per_expert)
    assert layers_of(cut)[1].get_submodule(router).weight.shape == (2, hidden)


def reference(dense, model_type: str, plan: PruningPlan) -> nn.Module:
    """The dense model with the plan's removals made in plain torch (zeroed columns, deleted layers)."""
    model = copy.deepcopy(dense)
    down_dim = FAMILIES[model_type][2]
    with torch.no_grad():
        for layer_plan in plan.layers:
            layer = layers_of(model)[layer_plan.layer]
            down = next(p for name, p in layer.named_parameters() if name.endswith("experts.down_proj"))
            for neuron in set(range(down.shape[down_dim])) - set(layer_plan.neurons):
                down.select(down_dim, neuron).zero_()
            attention = layer_plan.geometry.attention
            for head in set(range(attention.num_heads if attention else 0)) - set(layer_plan.query_heads):
                d = attention.head_dim
                layer.self_attn.o_proj.weight[:, head * d : (head + 1) * d] = 0
    kept = [p.layer for p in plan.layers if p.keep_layer]
    model.model.layers = nn.ModuleList(layers_of(model)[i] for i in kept)
    for position, layer in enumerate(layers_of(model)):
        layer.self_attn.layer_idx = position
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in kept]
    return model


#: model type → amounts beyond experts, neurons inside experts and a layer (heads where the derivation verifies them).
COMBINED = {
    "mixtral": {"attention_heads": 1},
    "qwen2_moe": {"attention_heads": 1},
    "qwen3_moe": {"attention_heads": 1},
    "olmoe": {},  # heads refused by the derivation (q_norm over the whole projection)
    "granitemoe": {"attention_heads": 1},
    "gpt_oss": {"attention_heads": 1},  # its per-head attention sinks go with their head
}
#: Types whose config derives the head size (or k_norm width) from the head count: heads need the loader format.
LOADER = {"qwen2_moe", "qwen3_moe", "granitemoe"}


@functools.cache
def pruned_case(model_type: str, root: Path) -> dict:
    dense, inputs = tiny(model_type)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(
        experts=1, mlp_neurons=0.25, layers=1, **COMBINED[model_type], criterion="magnitude", reconstruct="none"
    )
    plan = pruner.plan
    removed = {
        position: sorted(set(range(4)) - set(p.experts))
        for position, p in enumerate(q for q in plan.layers if q.keep_layer)
    }
    model = reference(dense, model_type, plan)
    with routers_exclude(model, model_type, removed):
        expected = logits(model, inputs)
    pruned = logits(pruner.model, inputs)
    generated = pruner.model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    pruner.save_pretrained(root / model_type / "model")
    save_file(
        {"logits": expected.contiguous(), "generated": generated, **inputs},
        str(root / model_type / "expected.safetensors"),
    )
    return {"pruner": pruner, "expected": expected, "pruned": pruned, "dense": dense}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experts")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_experts_neurons_heads_and_a_layer_cut_exactly(model_type, root):
    case = pruned_case(model_type, root)
    pruner, config = case["pruner"], case["pruner"].model.config
    torch.testing.assert_close(case["pruned"], case["expected"], atol=1e-5, rtol=0)
    assert config.num_hidden_layers == 2
    width = {p.geometry.intermediate_size - len(p.neurons) for p in pruner.plan.layers if p.keep_layer}
    assert len(width) == 1 and width.pop() > 0
    vanilla = model_type not in LOADER
    assert (pruner.report.output_format == "vanilla") == vanilla, pruner.report.output_format
    if vanilla:  # the loader format keeps the dense config and writes every layer's shape beside it
        assert getattr(config, COUNT_FIELDS[model_type]) == 3


def test_checkpoints_reload_in_a_fresh_process(root):
    """Vanilla folders load with plain transformers (hf_prune never imported), loader ones with load_pruned;
    equal logits and equal greedy tokens."""
    for model_type in FAMILIES:
        pruned_case(model_type, root)
    process = subprocess.run(
        [sys.executable, str(RELOAD_SCRIPT), "AutoModelForCausalLM", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},  # this checkout's hf_prune
    )
    assert process.returncode == 0, process.stdout + process.stderr
    results = json.loads(process.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(FAMILIES)
    for model_type, outcome in results.items():
        assert outcome["max_abs_diff"] <= 1e-5 and outcome["generate_equal"], (model_type, outcome)
        assert (outcome["format"] == "vanilla") == (model_type not in LOADER), (model_type, outcome)


def test_experts_per_token_must_stay():
    model, _ = tiny("mixtral")
    with pytest.raises(InvalidPruningTargetError, match=r"experts=3 keeps 1 of the 4.*num_experts_per_tok.*at most 2"):
        HFPruner(model).prune(experts=3, criterion="magnitude", reconstruct="none")


def test_routing_statistics_and_criteria_against_plain_torch():
    """Frequency, mean gate weight and REAP from the one calibration pass equal a plain-torch recomputation of
    the router and experts of layer 0 on the same hidden states (Mixtral: softmax, top-2, renormalised)."""
    model, _ = tiny("mixtral")
    adapter = get_adapter(model.config)
    windows = calibration_windows(count=4, length=8)
    stats = collect_statistics(model, adapter, windows, {"routing", "expert_norms"})
    captured = []
    moe = layers_of(model)[0].mlp
    handle = moe.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model.model(windows[0])
    handle.remove()
    x = captured[0]
    probabilities = torch.softmax(x @ moe.gate.weight.T, dim=-1)
    top, chosen = probabilities.topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    frequency, gate, reap = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    act = nn.functional.silu
    for token in range(x.shape[0]):
        for k in range(2):
            j = chosen[token, k].item()
            gate_row, up_row = (moe.experts.gate_up_proj[j] @ x[token]).chunk(2)
            output = moe.experts.down_proj[j] @ (act(gate_row) * up_row)
            frequency[j] += 1
            gate[j] += top[token, k]
            reap[j] += top[token, k] * output.norm()
    routing = stats.routing[0]
    assert routing.tokens == x.shape[0]
    torch.testing.assert_close(routing.selected.float(), frequency)
    torch.testing.assert_close(routing.gate.float(), gate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routing.weighted_norm.float(), reap, atol=1e-4, rtol=1e-4)
    from hf_prune.criteria import ScoringContext, get_criterion

    context = ScoringContext(model, adapter, stats)
    groups = adapter.groups(layers_of(model)[0], 0, "experts")
    expected = {"frequency": frequency / x.shape[0], "gate_weight": gate / x.shape[0], "reap": reap / frequency}
    for name, values in expected.items():
        scores = get_criterion(name).score(context, groups).float()
        torch.testing.assert_close(scores, values.nan_to_num(0.0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("criterion", ["frequency", "gate_weight", "reap", "random"])
def test_prune_with_each_expert_criterion(criterion):
    model, inputs = tiny("olmoe")
    pruner = HFPruner(model)
    config = PruningConfig(
        experts=0.25,
        criterion={"experts": criterion},
        calibration=calibration_windows(count=4, length=8),
        num_samples=4,
        seq_len=8,
        reconstruct="none",
    )
    pruner.prune(config)
    assert pruner.model.config.num_experts == 3
    assert pruner.report.output_format == "vanilla"
    assert torch.isfinite(logits(pruner.model, inputs)).all()


def test_inspect_lists_experts_per_layer_and_the_card_shows_them_kept(root, capsys):
    """`hf-prune inspect` on a pruned vanilla folder (config only): the experts column and the routed-experts
    kind; the saved card's per-layer table has the routed experts kept (4 → 3)."""
    pruned_case("mixtral", root)
    folder = root / "mixtral" / "model"
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.strip().startswith("layers"))
    assert header.split()[-1] == "experts"
    row = next(line for line in out.splitlines() if line.strip().startswith("0-1"))
    assert row.split()[-1] == "3"  # 3 experts kept in both remaining layers (4 before)
    kinds = next(line for line in out.splitlines() if line.startswith("routed experts"))
    assert kinds.split()[2] == "6" and kinds.endswith("vanilla")
    card = (folder / "README.md").read_text()
    table = [line for line in card.splitlines() if line.startswith("|")]
    assert "routed experts" in table[0]
    column = table[0].split("|").index(" routed experts ")
    kept = [line.split("|")[column].strip() for line in table[2:] if "layer removed" not in line and "–" not in line]
    assert kept and set(kept[:2]) == {"4 → 3"}, table


def test_what_is_not_supported_yet_is_refused_naming_the_fix():
    """Data criteria for neurons inside experts (budgets, the callback: tests/test_experts_workflows.py)."""
    model, _ = tiny("mixtral")
    pruner = HFPruner(model)
    with pytest.raises(InvalidPruningTargetError, match=r"criterion 'obs' cannot rank the neurons inside routed"):
        pruner.prune(experts=1, mlp_neurons=0.25, calibration=calibration_windows(), num_samples=8, seq_len=16)
    assert sum(p.numel() for p in pruner.model.parameters()) == sum(p.numel() for p in model.parameters())


def test_default_criteria_and_least_squares_repair_with_experts_and_heads():
    """The defaults (REAP for experts, OBS + least-squares repair for heads) on Mixtral: experts and heads go,
    the repaired attention and the routing stay finite; the folder is vanilla."""
    model, inputs = tiny("mixtral")
    pruner = HFPruner(model)
    pruner.prune(experts=1, attention_heads=1, calibration=calibration_windows(), num_samples=8, seq_len=16)
    assert pruner.model.config.num_local_experts == 3 and pruner.model.config.num_attention_heads == 2
    assert pruner.report.output_format == "vanilla"
    assert torch.isfinite(logits(pruner.model, inputs)).all()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_whole_moe_block_removed_equals_a_zero_output(model_type, tmp_path):
    """`mlp_branches=1` (block influence, from the calibration pass) removes one layer's whole MoE block, shared
    expert included: the cut model equals the dense one whose MoE module returns zeros there (a plain-torch
    forward hook), and the loader-format folder loads back (load_pruned) to the same logits."""
    dense, inputs = tiny(model_type)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_branches=1, calibration=calibration_windows(), num_samples=8, seq_len=16, reconstruct="none")
    (gone,) = [p.layer for p in pruner.plan.layers if not p.keep_mlp]
    moe = "block_sparse_moe" if model_type == "granitemoe" else "mlp"

    def zero(module, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]), *output[1:])
        return torch.zeros_like(output)

    handle = layers_of(dense)[gone].get_submodule(moe).register_forward_hook(zero)
    expected = logits(dense, inputs)
    handle.remove()
    torch.testing.assert_close(logits(pruner.model, inputs), expected, atol=1e-5, rtol=0)
    assert pruner.report.output_format == "loader"
    pruner.save_pretrained(tmp_path / "model")
    reloaded = load_pruned(tmp_path / "model").eval()
    torch.testing.assert_close(logits(reloaded, inputs), expected, atol=1e-5, rtol=0)


def test_flops_per_token_count_the_routed_experts_a_token_runs():
    """Per token: every Linear, the router, and num_experts_per_tok experts' weights (plain torch count from the
    modules), plus attention over the context; removing experts keeps it, neurons inside experts lower it."""
    model, _ = tiny("mixtral")
    config, context = model.config, 64
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    per_layer = 0
    for layer in layers_of(model):
        experts = layer.mlp.experts
        per_layer += (
            2 * (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) + layer.mlp.gate.weight.numel()
        )
        per_layer += 2 * config.num_attention_heads * config.head_dim * context
    assert flops_per_token(model, context) == 2 * (linear + per_layer)
    pruner = HFPruner(copy.deepcopy(model))
    pruner.prune(experts=1, criterion="magnitude", reconstruct="none")
    fewer_experts = flops_per_token(pruner.model, context)
    assert fewer_experts == 2 * (linear + per_layer) - 2 * len(layers_of(model)) * config.hidden_size
    pruner = HFPruner(copy.deepcopy(model))
    pruner.prune(mlp_neurons=0.25, criterion="magnitude", reconstruct="none")
    assert flops_per_token(pruner.model, context) < flops_per_token(model, context)
