"""Bad input gets a typed error that names the argument and the fix, and nothing is lost."""

import os

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, STRUCTURAL, calibration_images, calibration_windows
from transformers import AlbertConfig, AlbertForMaskedLM

from hf_prune import (
    HFPruner,
    InvalidPruningTargetError,
    NonFiniteError,
    NotPrunedError,
    OutputExistsError,
    PruningConfig,
    UnsupportedArchitectureError,
    VanillaFormatError,
)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name in before:  # bit for bit; a NaN the model held before counts as equal to itself
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    # ALBERT: no hand-written adapter, and none derivable (every layer shares one layer's weights).
    model = AlbertForMaskedLM(
        AlbertConfig(
            vocab_size=50,
            embedding_size=16,
            hidden_size=16,
            num_attention_heads=2,
            num_hidden_layers=2,
            intermediate_size=37,
        )
    )
    with pytest.raises(
        UnsupportedArchitectureError, match=r"'albert'.*Supported: bert, convnext, deit, gemma3_text, gpt2"
    ):
        HFPruner(model)
    model.save_pretrained(tmp_path / "albert")
    with pytest.raises(UnsupportedArchitectureError, match="'albert'"):
        HFPruner.from_pretrained(tmp_path / "albert")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mlp_neurons": 1.5}, r"mlp_neurons=1\.5 is a fraction and must lie in \[0, 1\)"),
        ({"layers": 2.0}, r"For a count, pass an int: layers=2"),
        ({"kv_groups": -1}, r"kv_groups=-1 is a count and must be >= 0"),
        ({"attention_heads": True}, r"booleans are not amounts"),
        ({"mlp_neurons": "half"}, r"mlp_neurons='half' must be a float fraction"),
        ({"criterion": "oracle"}, r"criterion='oracle' is unknown; choose one of activation, block_influence"),
        ({"allocation": "greedy"}, r"allocation='greedy' is unknown"),
    ],
)
def test_invalid_amounts_are_refused_by_the_config(kwargs, message):
    with pytest.raises(InvalidPruningTargetError, match=message):
        PruningConfig(**kwargs)


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("llama", {"layers": 4}, r"layers=4 removes all 4 layers; remove at most 3"),
        ("llama", {"kv_groups": 3}, r"kv_groups=3 removes all 3 KV groups of layer 0; the largest valid value is 2"),
        ("llama", {"attention_heads": 2}, r"removes all 2 query heads of each KV group; the largest valid value is 1"),
        (
            "llama",
            {"attention_heads": 0.2},
            r"rounds to 0 of the 2 query heads in each KV group; the smallest valid fraction is 0\.25",
        ),
        ("llama", {"mlp_neurons": 48}, r"mlp_neurons=48 removes all 48 neurons of layer 0"),
        ("llama", {"mlp_neurons": 0.001}, r"rounds to 0 of 48 neurons; the smallest valid fraction is 0\.0104"),
        ("llama", {"mlp_branches": 4}, r"mlp_branches=4 removes all 4 remaining mlp branches"),
        ("llama", {"layers": 1, "attention_branches": 3}, r"attention_branches=3 removes all 3 remaining"),
        ("gpt2", {"kv_groups": 1}, r"multi-head attention .* use attention_heads"),
        ("bert", {"attention_heads": 4}, r"attention_heads=4 removes all 4 heads of layer 0"),
        ("llama", {}, r"nothing to remove"),
    ],
)
def test_impossible_targets_leave_the_model_untouched(family, kwargs, message):
    pruner = HFPruner(FAMILIES[family].build())
    before = snapshot(pruner.model)
    with pytest.raises(InvalidPruningTargetError, match=message):
        pruner.prune(**kwargs)
    assert_unchanged(pruner.model, before)


def test_require_vanilla_refuses_before_touching_the_model():
    pruner = HFPruner(FAMILIES["bert"].build())
    before = snapshot(pruner.model)
    with pytest.raises(VanillaFormatError, match=r"require_vanilla=True.*BertConfig rejects"):
        pruner.prune(attention_heads=1, require_vanilla=True)
    assert_unchanged(pruner.model, before)
    assert pruner.prune(mlp_neurons=0.5, require_vanilla=True, **STRUCTURAL).output_format == "vanilla"


def test_save_before_prune_is_an_error(tmp_path):
    with pytest.raises(NotPrunedError, match="call prune"):
        HFPruner(FAMILIES["llama"].build()).save_pretrained(tmp_path / "out")


def test_existing_output_folder_is_refused_and_untouched(tmp_path):
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="exists and is not empty.*overwrite=True"):
        pruner.save_pretrained(target)
    assert os.listdir(target) == ["notes.txt"] and (target / "notes.txt").read_text() == "mine"
    pruner.save_pretrained(target, overwrite=True)
    assert (target / "model.safetensors").exists() and not (target / "notes.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def _interrupt_after_weights(model):
    original = model.save_pretrained

    def save_then_die(folder, *args, **kwargs):
        original(folder, *args, **kwargs)
        raise KeyboardInterrupt  # as if the user hit Ctrl-C halfway through

    model.save_pretrained = save_then_die


def test_interrupted_save_leaves_no_partial_output(tmp_path):
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)
    _interrupt_after_weights(pruner.model)
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("previous run")
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)
    _interrupt_after_weights(pruner.model)
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(target, overwrite=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old.txt"]


# ----------------------------------------------------------------- NaN and Inf
CALIBRATION = {"calibration": calibration_windows(), "num_samples": 8, "seq_len": 16, "batch_size": 4}


def _poisoned(place: str):
    """A tiny Llama with one bad weight: (model, the tensor's name, the count the message must give)."""
    model = FAMILIES["llama"].build()
    with torch.no_grad():
        if place == "nan":
            model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
            return model, "model.layers.1.mlp.up_proj.weight", "1 NaN"
        if place == "inf":
            model.model.layers[2].mlp.down_proj.weight[0, 7] = -float("inf")
            return model, "model.layers.2.mlp.down_proj.weight", "1 Inf"
        model.model.embed_tokens.weight[CALIBRATION["calibration"][0][0, 0]] = float("nan")  # a row calibration reads
        return model, "model.embed_tokens.weight", f"{model.config.hidden_size} NaN"


@pytest.mark.parametrize("propagate", ["unpruned", "pruned"])
@pytest.mark.parametrize("place", ["nan", "inf", "embedding row"])
def test_non_finite_weight_is_named_before_anything_changes(place, propagate):
    """Default criterion and repair: without the check this ended in `linalg.cholesky ... not positive-definite`
    (and, layer by layer, with the layers before the bad one already masked)."""
    model, name, count = _poisoned(place)
    pruner = HFPruner(model)
    before = snapshot(model)
    with pytest.raises(NonFiniteError, match=rf"{name}: {count} of [\d,]+ values.*float32.*model is unchanged"):
        pruner.prune(mlp_neurons=0.25, propagate=propagate, **CALIBRATION)
    assert_unchanged(model, before)
    assert pruner.report is None


def _overflowing(layer: int):
    """Finite weights whose activations overflow float32 at layer `layer`'s MLP, as float16 models overflow
    at 65504: its `up_proj` scaled by 1e30 makes the squares of the `down_proj` inputs (~1e60) Inf."""
    model = FAMILIES["llama"].build()
    with torch.no_grad():
        model.model.layers[layer].mlp.up_proj.weight.mul_(1e30)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return model


@pytest.mark.parametrize("propagate, layer", [("unpruned", 1), ("pruned", 0), ("both", 0)])
def test_non_finite_statistics_name_the_layer_before_any_solve(propagate, layer):
    model = _overflowing(layer)
    pruner = HFPruner(model)
    before = snapshot(model)
    with pytest.raises(
        NonFiniteError,
        match=rf"statistics hold NaN or Inf, first at the inputs of model\.layers\.{layer}\.mlp\.down_proj "
        r"\(sum of squares.*activations overflowed.*float32.*model is unchanged",
    ):
        pruner.prune(mlp_neurons=0.25, propagate=propagate, **CALIBRATION)
    assert_unchanged(model, before)


def test_layer_by_layer_says_when_earlier_layers_are_already_pruned():
    """Layer by layer, an overflow behind pruned layers is found at its own layer: the message says to reload."""
    with pytest.raises(NonFiniteError, match=r"model\.layers\.2\.mlp\.down_proj.*layers before layer 2 were already"):
        HFPruner(_overflowing(2)).prune(mlp_neurons=0.25, propagate="pruned", **CALIBRATION)


def test_non_finite_calibration_data_is_named():
    """NaN pixels in the calibration images: the first consumer that reads them is named."""
    model = FAMILIES["vit"].build()
    images = calibration_images()
    images[0][2, 1, 3, 4] = float("nan")
    model.get_submodule("vit.layers.0.attention.o_proj")  # the first consumer the statistics track
    before = snapshot(model)
    with pytest.raises(
        NonFiniteError, match=r"first at the inputs of vit\.layers\.0\.attention\.o_proj .*calibration data"
    ):
        HFPruner(model).prune(mlp_neurons=0.25, calibration=images, num_samples=8, batch_size=4)
    assert_unchanged(model, before)


@pytest.mark.parametrize("case", ["weight", "statistics"])
def test_low_memory_checks_each_layer_as_it_is_read(tmp_path, case):
    if case == "weight":
        model, name, count = _poisoned("inf")
        message = rf"checkpoint in .*{name}: {count}"
    else:
        model, message = _overflowing(1), r"first at the inputs of model\.layers\.1\.mlp\.down_proj"
    model.save_pretrained(tmp_path / "bad", max_shard_size="100KB")
    files = {file.name: load_file(file) for file in (tmp_path / "bad").glob("*.safetensors")}
    pruner = HFPruner.from_pretrained(tmp_path / "bad", low_memory=True)
    with pytest.raises(NonFiniteError, match=message + r".*checkpoint files are unchanged"):
        pruner.prune(mlp_neurons=0.25, **CALIBRATION)
    assert sorted(files) == sorted(file.name for file in (tmp_path / "bad").glob("*.safetensors"))
    for file, tensors in files.items():
        again = load_file(tmp_path / "bad" / file)
        for tensor_name, tensor in tensors.items():
            torch.testing.assert_close(again[tensor_name], tensor, rtol=0, atol=0, equal_nan=True)
