"""The OBS-style expert criterion and the merge repair (issue 16) against plain torch.

`output_error`: the reference removes each expert in turn the way tests/test_experts.py's reference does (the
family's own router code with −∞ added to that expert's logit, by wrapping `torch.nn.functional.linear`), runs
the MoE block on the calibration hidden states it captured, and sums `‖y − y₋ⱼ‖²` over the tokens.
`expert_repair="merge"`: the frequency-weighted averages recomputed from the routing the family's own router
produced, the cut model against the merged, uncut one with the removed experts' logits at −∞.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from list_moe import ListMoeConfig
from safetensors.torch import save_file
from test_experts import COUNT_FIELDS, RELOAD_SCRIPT, layers_of, logits, routers_exclude, tiny
from test_experts_workflows import LOW_MEMORY, weights
from tiny_models import calibration_windows
from torch import nn

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.criteria import ScoringContext, get_criterion
from hf_prune.derivation.derive import build_tiny
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.groups import get_adapter

#: families whose routers renormalise the top-k weights on the tiny config, and two that do not (every token
#: re-run), GPT-OSS with its router bias and expert biases.
REMOVAL_FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "gpt_oss"]


def moe_inputs(model: nn.Module, moe_module: str, windows: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Layer → the hidden states its MoE block read over the calibration windows (tokens × H)."""
    captured: dict[int, list[torch.Tensor]] = {}

    def keep(index: int):
        return lambda m, args: captured.setdefault(index, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [
        layer.get_submodule(moe_module).register_forward_pre_hook(keep(index))
        for index, layer in enumerate(layers_of(model))
    ]
    with torch.no_grad():
        for batch in windows:
            model.model(batch)
    for handle in handles:
        handle.remove()
    return {index: torch.cat(parts) for index, parts in captured.items()}


def block_output(moe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        output = moe(x[None])
    return (output[0] if isinstance(output, tuple) else output)[0]


@pytest.mark.parametrize("model_type", REMOVAL_FAMILIES)
def test_output_error_equals_removing_each_expert_in_plain_torch(model_type):
    model, _ = tiny(model_type)
    adapter = get_adapter(model.config)
    windows = calibration_windows(count=4, length=8)
    stats = collect_statistics(model, adapter, windows, {"routing", "expert_removal"})
    inputs = moe_inputs(model, adapter.expert_layout.moe_module, windows)
    context = ScoringContext(model, adapter, stats)
    for index, layer in enumerate(layers_of(model)):
        moe = layer.get_submodule(adapter.expert_layout.moe_module)
        x = inputs[index]
        dense = block_output(moe, x)
        expected = torch.zeros(4, dtype=torch.float64)
        for expert in range(4):
            with routers_exclude(model, model_type, {index: [expert]}):
                expected[expert] = (dense - block_output(moe, x)).double().pow(2).sum() / x.shape[0]
        assert expected.max() > 0  # removals matter (GPT-OSS routes no token to some experts here: 0 both ways)
        scores = get_criterion("output_error").score(context, adapter.groups(layer, index, "experts"))
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-9)
        assert torch.equal(scores.argsort(stable=True), expected.argsort(stable=True))


def test_first_order_output_error_renormalises_without_reselection():
    """Mixtral (softmax, top-2 of 4, renormalised): the tokens routed to j lose it and the other chosen expert
    takes the whole weight; the others are unchanged. Recomputed from the router and experts in plain torch."""
    model, _ = tiny("mixtral")
    adapter = get_adapter(model.config)
    windows = calibration_windows(count=4, length=8)
    stats = collect_statistics(model, adapter, windows, {"routing", "expert_norms"})
    x = moe_inputs(model, "mlp", windows)[0]
    moe = layers_of(model)[0].mlp
    top, chosen = torch.softmax(x @ moe.gate.weight.T, dim=-1).topk(2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    act = nn.functional.silu
    expected = torch.zeros(4, dtype=torch.float64)
    for token in range(x.shape[0]):
        outputs = []
        for j in chosen[token].tolist():
            gate_row, up_row = (moe.experts.gate_up_proj[j] @ x[token]).chunk(2)
            outputs.append(moe.experts.down_proj[j] @ (act(gate_row) * up_row))
        y = top[token, 0] * outputs[0] + top[token, 1] * outputs[1]
        for k, j in enumerate(chosen[token].tolist()):
            other = 1 - k
            without = top[token, other] * outputs[other] / top[token, other]
            expected[j] += (y - without).double().pow(2).sum()
    expected /= x.shape[0]
    context = ScoringContext(model, adapter, stats)
    groups = adapter.groups(layers_of(model)[0], 0, "experts")
    scores = get_criterion("output_error_first_order").score(context, groups)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-9)


def _routing_counts(indices: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens routed to each expert, tokens routed to both i and j) from the router's top-k indices."""
    chosen = torch.zeros(indices.shape[0], experts)
    for token, row in enumerate(indices.tolist()):
        chosen[token, row] = 1
    return chosen.sum(0), chosen.T @ chosen


@pytest.mark.parametrize("model_type", ["mixtral", "gpt_oss"])
def test_merge_folds_removed_experts_into_their_most_co_routed_kept_expert(model_type, tmp_path):
    """The merged expert tensors equal the frequency-weighted average over the kept expert and the removed ones
    whose most frequent kept companion it is, counted here from the family's own router outputs; the cut model
    equals the merged, uncut model with the removed experts' router logits at −∞ (plain torch); the folder
    reloads with plain transformers in a fresh process."""
    dense, inputs = tiny(model_type)
    adapter = get_adapter(dense.config)
    layout = adapter.expert_layout
    pruner = HFPruner(copy.deepcopy(dense))
    seen: dict[int, list[torch.Tensor]] = {}

    def keep(index: int):  # the router's top-k indices, its one integer output
        return lambda m, args, output: seen.setdefault(index, []).append(
            next(t for t in output if not t.is_floating_point())
        )

    handles = [
        layer.get_submodule(layout.router).register_forward_hook(keep(index))
        for index, layer in enumerate(layers_of(pruner.model))
    ]
    config = PruningConfig(
        experts=2,
        criterion={"experts": "gate_weight"},
        expert_repair="merge",
        calibration=calibration_windows(count=4, length=8),
        num_samples=4,
        seq_len=8,
        reconstruct="none",
    )
    config, plan, calibration = pruner.plan_and_repair(config)
    for handle in handles:
        handle.remove()
    merged_somewhere = False
    for layer_plan in plan.layers:
        index, kept = layer_plan.layer, list(layer_plan.experts)
        counts, together = _routing_counts(torch.cat(seen[index]), 4)
        sources = {t: [t] for t in kept}
        for expert in sorted(set(range(4)) - set(kept)):
            if together[expert, kept].max() > 0:
                sources[kept[int(together[expert, kept].argmax())]].append(expert)
        for name, parameter in layers_of(dense)[index].get_submodule(layout.experts_module).named_parameters():
            merged = layers_of(pruner.model)[index].get_submodule(layout.experts_module).get_parameter(name)
            for target, members in sources.items():
                weights = counts[members] / counts[members].sum()
                expected = sum(w * parameter[m].double() for w, m in zip(weights.tolist(), members))
                torch.testing.assert_close(merged[target].double(), expected, atol=1e-6, rtol=1e-6)
                merged_somewhere |= len(members) > 1
    assert merged_somewhere

    removed = {p.layer: p.removed_experts() for p in plan.layers}
    uncut = copy.deepcopy(pruner.model)
    with routers_exclude(uncut, model_type, removed):
        expected = logits(uncut, inputs)
    pruner.apply(plan, config, calibration)
    assert getattr(pruner.model.config, COUNT_FIELDS[model_type]) == 2
    torch.testing.assert_close(logits(pruner.model, inputs), expected, atol=1e-5, rtol=0)
    assert (expected - logits(dense, inputs)).abs().max() > 1e-4
    assert pruner.report.output_format == "vanilla"
    generated = pruner.model.generate(inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0)
    pruner.save_pretrained(tmp_path / model_type / "model")
    save_file(
        {"logits": expected.contiguous(), "generated": generated, **inputs},
        str(tmp_path / model_type / "expected.safetensors"),
    )
    process = subprocess.run(
        [sys.executable, str(RELOAD_SCRIPT), "AutoModelForCausalLM", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert process.returncode == 0, process.stdout + process.stderr
    outcome = json.loads(process.stdout.strip().splitlines()[-1])[model_type]
    assert outcome["format"] == "vanilla" and outcome["max_abs_diff"] <= 1e-5 and outcome["generate_equal"], outcome


def test_unknown_expert_repair_is_refused_naming_the_choices():
    message = r"expert_repair='average' is unknown; choose one of none, merge"
    with pytest.raises(InvalidPruningTargetError, match=message):
        PruningConfig(experts=0.25, expert_repair="average")


def test_per_expert_module_lists_refuse_output_error_and_merging():
    """A per-expert module list's block applies the gate weights itself (`list_moe.py`): no top-k outputs to
    re-weigh, no co-routing counts; typed errors naming what works."""
    model, _ = build_tiny(ListMoeConfig, seed=3)
    common = {"experts": 1, "calibration": calibration_windows(count=4, length=8), "num_samples": 4, "seq_len": 8}
    for criterion in ("output_error", "output_error_first_order"):
        with pytest.raises(InvalidPruningTargetError, match=r"per-expert module list.*'frequency'"):
            HFPruner(copy.deepcopy(model)).prune(criterion={"experts": criterion}, **common)
    with pytest.raises(InvalidPruningTargetError, match=r"per-expert module list.*expert_repair='none'"):
        HFPruner(copy.deepcopy(model)).prune(criterion={"experts": "frequency"}, expert_repair="merge", **common)


def test_low_memory_scores_and_merges_as_in_memory(tmp_path):
    """Layer by layer from the checkpoint (`low_memory=True`), `output_error` from each layer's own routing and
    the merge repair give the in-memory prune's plan and tensors (the merge changes them: not plain removal)."""
    dense, _ = tiny("mixtral", seed=5)
    dense.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    config = {**LOW_MEMORY, "criterion": {**LOW_MEMORY["criterion"], "experts": "output_error"}}
    saved = {}
    runs = (("in_memory", False, "merge"), ("layered", True, "merge"), ("plain", False, "none"))
    for name, low_memory, repair in runs:
        pruner = HFPruner.from_pretrained(tmp_path / "dense", low_memory=low_memory)
        pruner.prune(**config, expert_repair=repair)
        saved[name] = (pruner.plan.to_dict(), weights(pruner.save_pretrained(tmp_path / name)))
    assert saved["layered"][0] == saved["in_memory"][0] == saved["plain"][0]
    for key, tensor in saved["in_memory"][1].items():
        torch.testing.assert_close(saved["layered"][1][key], tensor, rtol=0, atol=1e-6)
    assert any(not torch.equal(saved["plain"][1][key], t) for key, t in saved["in_memory"][1].items())
