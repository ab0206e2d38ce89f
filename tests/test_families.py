"""Every family × every pruning kind: surgery equals masking, the plan's parameter count holds,
the saved folder reloads in a fresh process with identical logits, generate() still works."""

from __future__ import annotations

import copy
import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FAMILIES, STRUCTURAL, TinyFamily, calibration_images, calibration_windows

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.masking import apply_masks
from hf_prune.repair.least_squares import reconstruct
from hf_prune.repair.removed_layers import FOLDING_REPAIRS, removed_layer_targets, removed_runs

RELOAD_SCRIPT = Path(__file__).with_name("reload_checkpoints.py")


def convolutional_scenarios(family: TinyFamily) -> dict[str, dict]:
    """Each supported kind alone, then seeded combinations through the default pipeline."""
    choices = {
        "channels": [0.25, 0.5, 3],
        "mlp_neurons": [0.25, 0.5, 5],
        "layers": [1, 2],
        "stage_channels": [0.25, 0.5, 3],
    }
    cases = {name: {name: choices[name][0], **STRUCTURAL} for name in family.convolutional_amounts}
    rng = random.Random(family.model_type)
    for index in range(3):
        combo = {name: rng.choice(choices[name]) for name in family.convolutional_amounts}
        cases[f"combo{index}"] = {**combo, "seed": index}
    return cases


def scenarios(family: TinyFamily) -> dict[str, dict]:
    """The single kinds, then three random combinations (seeded, so the suite is stable)."""
    if family.convolutional_amounts:
        return convolutional_scenarios(family)
    heads = {"attention_heads": 0.5} if family.gqa else {"attention_heads": 0.25}
    cases = {
        "heads": {**heads, **STRUCTURAL},
        "neurons": {"mlp_neurons": 0.25, **STRUCTURAL},
        "attention_branch": {"attention_branches": 1, **STRUCTURAL},
        "mlp_branch": {"mlp_branches": 1, **STRUCTURAL},
        "layer": {"layers": 1, **STRUCTURAL},
    }
    if family.gqa:
        cases["kv_groups"] = {"kv_groups": 1, **STRUCTURAL}
    rng = random.Random(family.model_type)
    for index in range(3):
        combo = {}
        while not any(combo.values()):
            combo = {
                "attention_heads": rng.choice([0, heads["attention_heads"], 1 if family.gqa else 2]),
                "mlp_neurons": rng.choice([0, 0.25, 0.5, 5]),
                "attention_branches": rng.choice([0, 1]),
                "mlp_branches": rng.choice([0, 1]),
                "layers": rng.choice([0, 1, 2]),
                "kv_groups": rng.choice([0, 1]) if family.gqa else 0,
            }
        # Combinations run the default pipeline: calibration, data-aware criteria, least-squares repair.
        cases[f"combo{index}"] = {**combo, "seed": index}
    return cases


CASES = [(name, case) for name, family in FAMILIES.items() for case in scenarios(family)]


def forward(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@functools.cache
def pruned_case(family_name: str, case: str, root: Path) -> dict:
    """Prune one case, compare with the masked reference, save it; cached across tests."""
    family = FAMILIES[family_name]
    dense = family.build()
    inputs = family.inputs()
    pruner = HFPruner(copy.deepcopy(dense))
    calibration = calibration_images() if family.vision else calibration_windows()
    config = PruningConfig(**scenarios(family)[case], calibration=calibration, batch_size=4)
    report = pruner.prune(config)
    masked = copy.deepcopy(dense)
    if config.reconstruct != "none":  # the reference is the repaired dense model, masked
        batches = config.calibration[0].split(config.batch_size)
        statistics = collect_statistics(masked, pruner.adapter, batches, {"moments", "mlp_gram", "stream_gram"})
        # ... with what removed layers added folded into the MLP before them, as the prune does.
        runs = removed_runs(masked, pruner.adapter, pruner.plan) if config.reconstruct in FOLDING_REPAIRS else []
        targets = removed_layer_targets(masked, pruner.adapter, batches, runs)
        reconstruct(masked, pruner.adapter, pruner.plan, statistics, config.reconstruct, targets)
    apply_masks(masked, pruner.adapter, pruner.plan)

    folder = root / family_name / case
    pruner.save_pretrained(folder / "model")
    expected = {"logits": forward(pruner.model, inputs), **inputs}
    if family.causal:
        expected["generated"] = pruner.model.generate(
            inputs["input_ids"], max_new_tokens=4, do_sample=False, pad_token_id=0
        )
    save_file({k: v.contiguous() for k, v in expected.items()}, str(folder / "expected.safetensors"))
    return {"pruner": pruner, "report": report, "masked": masked, "dense": dense, "inputs": inputs, "folder": folder}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("family_name, case", CASES)
def test_surgery_equals_masked_model(family_name, case, root):
    result = pruned_case(family_name, case, root)
    pruner, inputs = result["pruner"], result["inputs"]
    torch.testing.assert_close(forward(pruner.model, inputs), forward(result["masked"], inputs), atol=1e-5, rtol=0)

    report = result["report"]
    dense_count = sum(p.numel() for p in result["dense"].parameters())
    assert report.parameters_before == dense_count
    assert report.parameters_after == sum(p.numel() for p in pruner.model.parameters())
    assert report.parameters_after == dense_count - pruner.plan.removed_parameter_count(
        result["dense"], pruner.adapter
    )
    assert report.parameters_after < dense_count


@pytest.mark.parametrize("family_name", [n for n, f in FAMILIES.items() if f.causal])
def test_generate_after_layer_removal(family_name, root):
    result = pruned_case(family_name, "layer", root)
    pruner, inputs = result["pruner"], result["inputs"]
    assert pruner.model.config.num_hidden_layers == FAMILIES[family_name].build().config.num_hidden_layers - 1
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    pruned_tokens = pruner.model.generate(inputs["input_ids"], **kwargs)
    masked_tokens = result["masked"].generate(inputs["input_ids"], **kwargs)
    assert pruned_tokens.shape[1] == inputs["input_ids"].shape[1] + 6
    torch.testing.assert_close(pruned_tokens, masked_tokens)


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_reload_in_fresh_process(family_name, root):
    """One subprocess per family reloads every case: vanilla folders first, with plain
    transformers and hf_prune never imported; then loader-format folders with load_pruned."""
    family = FAMILIES[family_name]
    for case in scenarios(family):
        pruned_case(family_name, case, root)
    process = subprocess.run(
        [sys.executable, str(RELOAD_SCRIPT), family.auto_class, str(root / family_name)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    results = json.loads(process.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(scenarios(family))
    for case, outcome in results.items():
        report = pruned_case(family_name, case, root)["report"]
        assert outcome["format"] == report.output_format, case
        assert outcome["max_abs_diff"] <= 1e-5, (case, outcome)
        assert outcome.get("generate_equal", True), (case, outcome)
