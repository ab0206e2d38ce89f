"""`propagate="pruned"`: pruning layer by layer on the activations of the pruned layers."""

import copy

import pytest
import torch
from tiny_models import FAMILIES, calibration_images, calibration_windows
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, PruningConfig
from hf_prune.calibration.layer_inputs import capture_layer_inputs
from hf_prune.errors import InvalidPruningTargetError
from hf_prune.groups.registry import get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = {"mlp_neurons": 0.5, "num_samples": 8, "seq_len": 16, "batch_size": 4, "criterion": "obs"}


def _pruned(model, family, **settings):
    pruner = HFPruner(copy.deepcopy(model))
    calibration = calibration_images() if FAMILIES[family].vision else calibration_windows()
    pruner.prune(**{**SETTINGS, "calibration": calibration, **settings})
    return pruner


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
def test_the_first_layer_is_pruned_alike_and_later_layers_see_the_pruned_stream(family):
    model = FAMILIES[family].build()
    one_pass, layerwise = (_pruned(model, family, propagate=p) for p in ("unpruned", "pruned"))
    assert [p.neurons for p in one_pass.plan.layers][0] == [p.neurons for p in layerwise.plan.layers][0]
    first, later = (dict(m.model.named_parameters()) for m in (one_pass, layerwise))
    adapter = one_pass.adapter
    prefix = f"{adapter.layers_name(one_pass.model)}.0."
    for name in first:
        if name.startswith(prefix):
            torch.testing.assert_close(later[name], first[name], rtol=0, atol=0)
    last = f"{adapter.layers_name(one_pass.model)}.{len(adapter.layers(one_pass.model)) - 1}.{adapter.down_proj}"
    assert not torch.equal(first[last + ".weight"], later[last + ".weight"])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "bert", "vit", "resnet", "convnext"])
def test_captured_inputs_walk_the_layers_as_the_model_runs_them(family):
    """From the captured first input, each layer's input (through `entering`: ConvNeXt downsamples
    before a stage, outside its blocks) is what a plain forward pass feeds it; the capture leaves
    the model whole (stage-held blocks included)."""
    spec = FAMILIES[family]
    model, inputs = spec.build(), spec.inputs()
    adapter = get_adapter(model.config)
    layers = list(adapter.layers(model))
    seen = []
    handles = [
        layer.register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
        for layer in layers
    ]
    with torch.no_grad():
        logits = model(**inputs).logits
    for handle in handles:
        handle.remove()
    captured = capture_layer_inputs(model, adapter, list(inputs.values()), torch.device("cpu"))
    assert list(adapter.layers(model)) == layers
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)
    stream = captured.hidden
    for index, layer in enumerate(layers):
        captured.hidden = captured.entering(index, stream)
        torch.testing.assert_close(captured.hidden[0], seen[index], rtol=0, atol=1e-6)
        stream = captured.outputs(layer, index)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_carrying_the_dense_stream_brings_the_pruned_stream_closer_to_it(family):
    """`propagate="both"` refits each MLP toward the dense model's stream, not only the dense layer."""
    model = FAMILIES[family].build()
    windows = calibration_windows(count=32)[0]
    with torch.no_grad():
        dense = model.base_model(windows).last_hidden_state
    errors = {}
    for propagate in ("pruned", "both"):
        pruner = _pruned(model, family, propagate=propagate, num_samples=32, batch_size=8, calibration=[windows])
        with torch.no_grad():
            errors[propagate] = (pruner.model.base_model(windows).last_hidden_state - dense).pow(2).mean().item()
    assert errors["both"] < errors["pruned"]


def test_a_layer_by_layer_prune_saves_and_reloads(tmp_path):
    pruner = _pruned(
        FAMILIES["llama"].build(),
        "llama",
        propagate="pruned",
        kv_groups=1,
        layers=1,
        criterion={"default": "obs", "layers": "block_influence"},
    )
    assert pruner.report.output_format == "vanilla"
    reloaded = AutoModelForCausalLM.from_pretrained(pruner.save_pretrained(tmp_path / "out"))
    inputs = FAMILIES["llama"].inputs()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruner.model(**inputs).logits)


def test_layer_by_layer_refusals():
    pruner = HFPruner(FAMILIES["llama"].build())
    calibration = {"calibration": calibration_windows(), "num_samples": 8, "seq_len": 16}
    with pytest.raises(InvalidPruningTargetError, match="allocation='uniform'"):
        pruner.prune(sparsity=0.2, allocation="global", propagate="pruned", **calibration)
    with pytest.raises(InvalidPruningTargetError, match="layer-local criterion"):
        pruner.prune(mlp_neurons=0.5, criterion="taylor", propagate="pruned", **calibration)
    with pytest.raises(InvalidPruningTargetError, match="propagate='unpruned'"):
        pruner.prune(PruningConfig(mlp_neurons=0.5, propagate="pruned", **calibration), statistics=object())
    with pytest.raises(InvalidPruningTargetError, match="propagate='both' plans one layer at a time"):
        pruner.prune(sparsity=0.2, allocation="adaptive", propagate="both", **calibration)
    with pytest.raises(InvalidPruningTargetError, match="propagate='sideways' is unknown"):
        PruningConfig(mlp_neurons=0.5, propagate="sideways")
