"""Loader-format folders load anywhere: with hf_prune (`load_pruned`, no remote code) and, through
the `modeling_hf_prune.py` they carry, with plain transformers where hf_prune cannot be imported."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FAMILIES, STRUCTURAL

from hf_prune import HFPruner
from hf_prune.groups import get_adapter
from hf_prune.output.checkpoint import write_loader_config
from hf_prune.output.remote_code import MODULE_NAME, remote_module_source
from hf_prune.plan import PruningPlan
from hf_prune.surgery import apply_plan

LOAD_SCRIPT = Path(__file__).with_name("load_remote_code.py")


def save_case(root: Path, name: str, family, model, auto_class: str) -> None:
    inputs = family.inputs()
    with torch.no_grad():
        logits = model(**inputs).logits
    save_file({**inputs, "logits": logits.contiguous()}, str(root / name / "expected.safetensors"))
    (root / name / "auto_class.txt").write_text(auto_class)


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Every family with heads, neurons and one attention and one MLP branch removed (convolutional
    families: a quarter of their first kind's units); and a Qwen2 whose layers all differ (the
    non-uniform shapes only the loader format holds)."""
    root = tmp_path_factory.mktemp("remote")
    for name, family in FAMILIES.items():
        pruner = HFPruner(family.build())
        heads = 0.5 if family.gqa else 1
        amounts = (
            {family.convolutional_amounts[0]: 0.25}
            if family.convolutional_amounts
            else {"attention_heads": heads, "mlp_neurons": 0.25, "attention_branches": 1, "mlp_branches": 1}
        )
        report = pruner.prune(**amounts, **STRUCTURAL)
        assert report.output_format == "loader"
        pruner.save_pretrained(root / name / "model")
        save_case(root, name, family, pruner.model, family.auto_class)

    family = FAMILIES["qwen2"]
    model = family.build()
    adapter = get_adapter(model.config)
    plan = PruningPlan.keep_all(model, adapter)
    plan.layers[0].neurons = tuple(range(0, 48, 2))
    plan.layers[1].keep_layer = False
    plan.layers[2].kv_heads, plan.layers[2].query_heads = (0, 2), (0, 1, 4, 5)
    plan.layers[3].query_heads = (0, 2, 4)
    apply_plan(model, adapter, plan)
    model.save_pretrained(root / "qwen2_per_layer" / "model")
    write_loader_config(root / "qwen2_per_layer" / "model", model, adapter)
    save_case(root, "qwen2_per_layer", family, model, "AutoModelForCausalLM")
    return root


def load_in_fresh_processes(root: Path, modules_cache: Path) -> tuple[dict, dict]:
    """Both load paths, run side by side: (remote code without hf_prune, hf_prune.load_pruned)."""
    env = {**os.environ, "HF_MODULES_CACHE": str(modules_cache), "HF_HUB_OFFLINE": "1"}
    processes = [
        subprocess.Popen(
            [sys.executable, str(LOAD_SCRIPT), mode, str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for mode in ("remote", "hf_prune")
    ]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results[0], results[1]


def test_both_load_paths_give_the_family_class_and_identical_logits(cases, tmp_path):
    remote, local = load_in_fresh_processes(cases, tmp_path / "modules")
    expected_classes = {name: family.model_class for name, family in FAMILIES.items()}
    expected_classes["qwen2_per_layer"] = "Qwen2ForCausalLM"
    assert {case: row["class"] for case, row in remote.items()} == expected_classes
    assert {case: row["class"] for case, row in local.items()} == expected_classes
    assert all(row["max_abs_diff"] == 0 for row in [*remote.values(), *local.values()]), (remote, local)


def test_loader_folders_name_the_remote_code_in_auto_map(cases):
    config = json.loads((cases / "bert" / "model" / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": f"{MODULE_NAME}.HFPruneConfig",
        "AutoModel": f"{MODULE_NAME}.HFPruneModel",
        "AutoModelForMaskedLM": f"{MODULE_NAME}.HFPruneForMaskedLM",
    }
    assert (cases / "bert" / "model" / f"{MODULE_NAME}.py").read_text() == remote_module_source()


def test_the_remote_module_imports_only_torch_transformers_and_the_standard_library():
    tree = ast.parse(remote_module_source())
    imported = {
        (alias.name if isinstance(node, ast.Import) else node.module).partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))
    assert imported - set(sys.stdlib_module_names) == {"torch", "transformers"}
    # Every registered adapter travels with it.
    assert {f"class {name}Adapter(" for name in ("Llama", "Phi3", "GPT2", "GPTNeoX", "Bert", "ViT")} <= {
        line.split("ArchitectureAdapter")[0]
        for line in remote_module_source().splitlines()
        if line.startswith("class ")
    }
