"""`refine_epochs`: gradient refinement of each changed layer toward the dense stream."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, calibration_windows
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.layer_inputs import capture_layer_inputs
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.repair.block_refinement import refine_toward_dense, stream_error

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"mlp_neurons": 0.5, "num_samples": 32, "seq_len": 16, "batch_size": 4, "criterion": "obs"}


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_refinement_brings_the_pruned_stream_closer_to_the_dense_one(family):
    model = FAMILIES[family].build()
    windows = calibration_windows(count=32)[0]
    with torch.no_grad():
        dense = model.base_model(windows).last_hidden_state
    errors = {}
    for epochs in (0, 3):
        pruner = HFPruner(copy.deepcopy(model))
        pruner.prune(**SETTINGS, calibration=[windows], propagate="both", refine_epochs=epochs, refine_lr=1e-2)
        with torch.no_grad():
            errors[epochs] = (pruner.model.base_model(windows).last_hidden_state - dense).pow(2).mean().item()
    assert errors[3] < 0.9 * errors[0]


def test_removed_weights_stay_zero_and_a_diverging_refinement_is_undone():
    model = FAMILIES["llama"].build().eval()
    batches = list(calibration_windows(count=8)[0].split(4))
    inputs = capture_layer_inputs(model, HFPruner(model).adapter, batches, torch.device("cpu"))
    layer = model.model.layers[0]
    down_proj = layer.mlp.down_proj.weight

    def remask():
        with torch.no_grad():
            down_proj[:, :8].zero_()

    remask()
    with torch.no_grad():
        target = [h + 0.1 for h in inputs.outputs(layer, 0)]
    before, after = refine_toward_dense(layer, 0, inputs, target, epochs=3, learning_rate=1e-4, remask=remask)
    assert after < before == pytest.approx(0.01, rel=0.2)
    assert torch.count_nonzero(down_proj[:, :8]) == 0
    assert all(p.requires_grad for p in layer.parameters())  # as the model had them

    weights = copy.deepcopy(layer.state_dict())
    start = stream_error(layer, 0, inputs, target)
    before, after = refine_toward_dense(layer, 0, inputs, target, epochs=2, learning_rate=1e3, remask=remask)
    assert before == after == pytest.approx(start)
    for name, tensor in layer.state_dict().items():
        torch.testing.assert_close(tensor, weights[name], rtol=0, atol=0)


def test_a_refined_prune_saves_and_reloads(tmp_path):
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(
        **{**SETTINGS, "num_samples": 8, "criterion": {"default": "obs", "layers": "block_influence"}},
        kv_groups=1,
        layers=1,
        calibration=calibration_windows(),
        propagate="both",
        refine_epochs=1,
    )
    assert pruner.report.output_format == "vanilla"
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    inputs = FAMILIES["llama"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruner.model(**inputs).logits)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"refine_epochs": 1}, "set propagate='both'"),
        ({"refine_epochs": 1, "propagate": "pruned"}, "set propagate='both'"),
        ({"refine_epochs": -1, "propagate": "both"}, "refine_epochs=-1 must be a non-negative int"),
        ({"refine_epochs": 1, "propagate": "both", "refine_lr": 0.0}, "refine_lr=0.0 must be a positive float"),
    ],
)
def test_refinement_settings_are_checked(settings, message):
    with pytest.raises(InvalidPruningTargetError, match=message):
        PruningConfig(mlp_neurons=0.5, **settings)
