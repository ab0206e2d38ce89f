"""Bad input gets a typed error that names the argument and the fix, and nothing is lost."""

import os

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from hf_prune import (
    HFPruner,
    InvalidPruningTargetError,
    NotPrunedError,
    OutputExistsError,
    PruningConfig,
    UnsupportedArchitectureError,
    VanillaFormatError,
)
from tiny_models import FAMILIES, STRUCTURAL


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    model = OPTForCausalLM(OPTConfig(hidden_size=16, num_attention_heads=2, ffn_dim=32, num_hidden_layers=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match=r"'opt'.*Supported: bert, convnext, deit, gemma3_text, gpt2"):
        HFPruner(model)
    model.save_pretrained(tmp_path / "opt")
    with pytest.raises(UnsupportedArchitectureError, match="'opt'"):
        HFPruner.from_pretrained(tmp_path / "opt")


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
        ("llama", {"attention_heads": 0.2}, r"rounds to 0 of the 2 query heads in each KV group; the smallest valid fraction is 0\.25"),
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
