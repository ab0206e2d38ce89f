"""Folding removed layers into the preceding MLP (`reconstruct="lstsq"` with `layers=`)."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, calibration_windows
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.masking import apply_masks
from hf_prune.plan import PruningPlan
from hf_prune.repair.least_squares import reconstruct
from hf_prune.repair.removed_layers import RemovedRun, removed_layer_targets, removed_runs

pytestmark = pytest.mark.usefixtures("one_thread")

PRE_NORM = ("llama", "qwen3", "phi3", "gpt2", "gpt_neox", "vit")


def _inputs(family, windows):
    if FAMILIES[family].vision:
        return {"pixel_values": torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    return {"input_ids": windows}


def _layer_output(model, adapter, index, inputs) -> torch.Tensor:
    """The residual stream after layer `index` (before any final norm)."""
    captured = []
    handle = adapter.layers(model)[index].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return captured[0]


@pytest.mark.parametrize("family", PRE_NORM)
def test_the_preceding_mlp_learns_what_the_removed_last_layer_added(family):
    model = FAMILIES[family].build()
    adapter = HFPruner(model).adapter
    inputs = _inputs(family, calibration_windows()[0])
    batches = next(iter(inputs.values())).split(4)
    last = len(adapter.layers(model)) - 1
    dense_stream = _layer_output(model, adapter, last, inputs)

    plan = PruningPlan.keep_all(model, adapter)
    plan.layers[last].keep_layer = False
    assert removed_runs(model, adapter, plan) == [RemovedRun(last - 1, last, last)]
    stats = collect_statistics(model, adapter, batches, {"moments", "mlp_gram"})
    targets = removed_layer_targets(model, adapter, batches, removed_runs(model, adapter, plan))

    errors = {}
    for folded in (False, True):
        pruned = copy.deepcopy(model)
        reconstruct(pruned, adapter, plan, stats, "lstsq", targets if folded else None)
        apply_masks(pruned, adapter, plan)
        errors[folded] = (_layer_output(pruned, adapter, last - 1, inputs) - dense_stream).pow(2).mean().item()
    assert errors[True] < 0.5 * errors[False]


def test_runs_need_a_preceding_layer_whose_mlp_writes_the_stream():
    model = FAMILIES["llama"].build()
    adapter = HFPruner(model).adapter
    plan = PruningPlan.keep_all(model, adapter)
    for index in (0, 2, 3):
        plan.layers[index].keep_layer = False
    assert removed_runs(model, adapter, plan) == [RemovedRun(1, 2, 3)]
    plan.layers[1].keep_mlp = False
    assert removed_runs(model, adapter, plan) == []

    gemma = FAMILIES["gemma3_text"].build()  # its MLP output is normalised before it joins the stream
    gemma_plan = PruningPlan.keep_all(gemma, adapter)
    gemma_plan.layers[3].keep_layer = False
    assert removed_runs(gemma, HFPruner(gemma).adapter, gemma_plan) == []


def test_layer_removal_with_lstsq_refits_only_the_writer_and_reloads(tmp_path):
    model = FAMILIES["llama"].build()
    pruners = {}
    for repair in ("none", "lstsq"):
        pruners[repair] = HFPruner(copy.deepcopy(model))
        pruners[repair].prune(
            layers=1, criterion="block_influence", reconstruct=repair, calibration=calibration_windows()
        )
    plan = pruners["lstsq"].plan
    removed = next(p.layer for p in plan.layers if not p.keep_layer)
    assert removed > 0, "the tiny model's weakest layer should have a predecessor for this test"
    plain, folded = (dict(pruners[r].model.named_parameters()) for r in ("none", "lstsq"))
    changed = {name for name in plain if not torch.equal(plain[name], folded[name])}
    assert changed == {f"model.layers.{removed - 1}.mlp.down_proj.weight"}

    folder = pruners["lstsq"].save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    inputs = FAMILIES["llama"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruners["lstsq"].model(**inputs).logits)
