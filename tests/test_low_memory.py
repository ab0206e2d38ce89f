"""Low-memory (layer-by-layer) pruning gives the in-memory result, keeps the model on the meta
device until asked, and refuses what needs the whole model at once."""

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import FAMILIES, calibration_images, calibration_windows
from transformers import AutoModelForCausalLM

from hf_prune import HFPruner, load_pruned
from hf_prune.calibration.statistics import collect_statistics
from hf_prune.errors import InvalidPruningTargetError, LowMemoryError, OutputExistsError

CALIBRATION = {
    "calibration": calibration_windows(),
    "num_samples": 8,
    "seq_len": 16,
    "batch_size": 4,
    "reconstruct": "lstsq",
}
CASES = {
    "heads+neurons/activation": {"kv_groups": 1, "mlp_neurons": 0.5, "criterion": "activation"},
    "layers+neurons/obs+influence": {
        "layers": 1,
        "mlp_neurons": 0.25,
        "criterion": {"neurons": "obs", "layers": "block_influence"},
    },
    "branch/magnitude (loader format)": {"attention_branches": 1, "mlp_neurons": 0.25, "criterion": "magnitude"},
    "sparsity+protected+round_to/activation+ispasp": {
        "sparsity": 0.3,
        "protected_layers": (0,),
        "round_to": 4,
        "criterion": "activation",
        "reconstruct": "ispasp",
    },
}


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A tiny Llama saved in several safetensors shards with an index, as large checkpoints are."""
    folder = tmp_path_factory.mktemp("models") / "sharded"
    FAMILIES["llama"].build().save_pretrained(folder, max_shard_size="100KB")
    return folder


def _weights(folder):
    return {name: t for file in sorted(folder.glob("*.safetensors")) for name, t in load_file(file).items()}


@pytest.mark.parametrize("case", list(CASES))
def test_low_memory_matches_in_memory(sharded_llama, tmp_path, one_thread, case):
    settings = {**CALIBRATION, **CASES[case]}
    dense = HFPruner.from_pretrained(sharded_llama)
    expected_report = dense.prune(**settings)
    expected = dense.save_pretrained(tmp_path / "in_memory")

    pruner = HFPruner.from_pretrained(sharded_llama, low_memory=True)
    report = pruner.prune(**settings)
    assert all(p.device.type == "meta" for p in pruner.model.parameters())  # pruned shapes, no weights
    assert report.layers == expected_report.layers and report.parameters_after == expected_report.parameters_after
    saved = pruner.save_pretrained(tmp_path / "low_memory")

    want, got = _weights(expected), _weights(saved)
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
    inputs = FAMILIES["llama"].inputs()
    logits = load_pruned(expected)(**inputs).logits
    torch.testing.assert_close(load_pruned(saved)(**inputs).logits, logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(pruner.load_model()(**inputs).logits, logits, rtol=0, atol=1e-5)
    with pytest.raises(OutputExistsError):  # no overwrite, and the first save stays whole
        pruner.save_pretrained(saved)
    again = pruner.save_pretrained(tmp_path / "again")
    assert _weights(again).keys() == _weights(saved).keys() == want.keys()


@pytest.mark.parametrize("case", ["heads+neurons/activation", "layers+neurons/obs+influence"])
def test_propagating_pruned_activations_matches_the_in_memory_layer_by_layer_prune(
    sharded_llama, tmp_path, one_thread, case
):
    """`propagate="pruned"`: later layers see what the pruned model computes; the low-memory loop
    and the in-memory `layerwise` prune run the same algorithm and write the same weights."""
    settings = {**CALIBRATION, **CASES[case], "propagate": "pruned"}
    dense = HFPruner.from_pretrained(sharded_llama)
    expected_report = dense.prune(**settings)
    expected = dense.save_pretrained(tmp_path / "in_memory")
    pruner = HFPruner.from_pretrained(sharded_llama, low_memory=True)
    report = pruner.prune(**settings)
    assert report.output_format == expected_report.output_format == "vanilla"
    assert report.layers == expected_report.layers
    want, got = _weights(expected), _weights(pruner.save_pretrained(tmp_path / "low_memory"))
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)


def test_low_memory_refusals(sharded_llama, tmp_path):
    pruner = HFPruner.from_pretrained(sharded_llama, low_memory=True)
    with pytest.raises(InvalidPruningTargetError, match="criterion 'taylor'.*low_memory=True.*activation"):
        pruner.prune(mlp_neurons=0.25, criterion="taylor", **dict(CALIBRATION))
    with pytest.raises(LowMemoryError, match="gguf_file"):
        HFPruner.from_pretrained(sharded_llama, low_memory=True, gguf_file="model.gguf")
    with pytest.raises(LowMemoryError, match="device= and dtype="):
        HFPruner.from_pretrained(sharded_llama, low_memory=True, propagate="pruned")
    (tmp_path / "config.json").write_text((sharded_llama / "config.json").read_text())
    with pytest.raises(LowMemoryError, match="safetensors"):
        HFPruner.from_pretrained(tmp_path, low_memory=True)


def test_cli_low_memory_writes_what_the_in_memory_prune_writes(tiny_llama, tmp_path, capsys, one_thread):
    from hf_prune.cli import main

    arguments = ["--kv-groups", "1", "--mlp-neurons", "0.25", "--layers", "1", "--criterion", "magnitude"]
    arguments += ["--reconstruct", "none"]
    assert main(["prune", "--model", str(tiny_llama), "--output", str(tmp_path / "a"), *arguments]) == 0
    assert (
        main(["prune", "--model", str(tiny_llama), "--output", str(tmp_path / "b"), "--low-memory", *arguments]) == 0
    )
    assert "layer removed" in capsys.readouterr().out
    want, got = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert sorted(got) == sorted(want) and all(torch.equal(got[name], want[name]) for name in want)
    code = main(
        ["prune", "--model", str(tiny_llama), "--output", str(tmp_path / "c"), "--low-memory", "--latency", *arguments]
    )
    assert code == 2 and "--low-memory" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_prune_in_memory_and_layer_by_layer_alike(tmp_path, one_thread, dtype):
    """bf16 / fp16 weights: statistics still accumulate in float64 (from float32 blocks), the repair
    is solved in float64 and written back in the model's dtype; both modes agree."""
    folder = tmp_path / "half"
    FAMILIES["llama"].build().to(dtype).save_pretrained(folder, max_shard_size="100KB")
    settings = {**CALIBRATION, **CASES["heads+neurons/activation"]}
    dense = HFPruner.from_pretrained(folder, dtype=dtype)
    statistics = collect_statistics(
        dense.model, dense.adapter, calibration_windows()[0].split(4), {"moments", "mlp_gram"}
    )
    assert statistics.consumers[(0, "mlp")].gram.dtype == torch.float64
    dense.prune(**settings)
    expected = dense.save_pretrained(tmp_path / "in_memory")
    pruner = HFPruner.from_pretrained(folder, low_memory=True)
    pruner.prune(**settings)
    saved = pruner.save_pretrained(tmp_path / "low_memory")
    want, got = _weights(expected), _weights(saved)
    assert all(tensor.dtype == dtype for tensor in got.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
    logits = load_pruned(saved, dtype=dtype)(**FAMILIES["llama"].inputs()).logits
    assert logits.dtype == dtype and torch.isfinite(logits).all()


#: Families whose capture or checkpoint names differ from Llama's run by default; the rest are `slow`.
#: ResNet and ConvNeXt name their blocks per stage, and ConvNeXt downsamples between stages.
DISTINCT = ("qwen2", "gemma3_text", "gpt_neox", "bert", "vit", "resnet", "convnext")
#: What the convolutional families prune instead of heads and neurons (their adapters' kinds; stage
#: channels span a whole stage and are refused layer by layer: tests/test_stage_channels.py).
OWN_AMOUNTS = {
    "resnet": {"channels": 0.25, "criterion": "activation"},
    "convnext": {
        "mlp_neurons": 0.25,
        "layers": 1,
        "criterion": {"neurons": "activation", "layers": "block_influence"},
    },
}


def _amounts(spec) -> dict:
    if spec.model_type in OWN_AMOUNTS:
        return OWN_AMOUNTS[spec.model_type]
    return {"mlp_neurons": 0.25, "kv_groups" if spec.gqa else "attention_heads": 1, "criterion": "activation"}


def _calibration(spec) -> dict:
    return {**CALIBRATION, "calibration": calibration_images() if spec.vision else calibration_windows()}


@pytest.mark.parametrize(
    "family", [name if name in DISTINCT else pytest.param(name, marks=pytest.mark.slow) for name in FAMILIES]
)
def test_every_family_prunes_layer_by_layer_as_in_memory(family, tmp_path, one_thread):
    """Per-layer arguments (sliding-window masks in Qwen2, local rotary embeddings in Gemma 3),
    renamed checkpoint keys (GPT-NeoX `embed_out`, ViT's legacy names), encoders and vision,
    blocks numbered per stage (ResNet, ConvNeXt) and downsampling between stages (ConvNeXt)."""
    spec = FAMILIES[family]
    spec.build().save_pretrained(tmp_path / "dense")
    settings = {**_calibration(spec), **_amounts(spec)}
    dense = HFPruner.from_pretrained(tmp_path / "dense")
    dense.prune(**settings)
    expected = load_pruned(dense.save_pretrained(tmp_path / "in_memory"))
    pruner = HFPruner.from_pretrained(tmp_path / "dense", low_memory=True)
    pruner.prune(**settings)
    got = load_pruned(pruner.save_pretrained(tmp_path / "low_memory"))
    # A tied LM head (Gemma 3) counts once, as torch counts it (it was counted twice before the check in apply).
    assert pruner.report.parameters_after == dense.report.parameters_after == sum(p.numel() for p in got.parameters())
    want = expected.state_dict()
    assert sorted(got.state_dict()) == sorted(want)
    for name, tensor in got.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", list(OWN_AMOUNTS))
def test_convolutional_families_prune_on_the_pruned_stream_as_in_memory(family, tmp_path, one_thread):
    """`propagate="pruned"`: each block measured on what the pruned blocks (and, between ConvNeXt
    stages, the downsampling layer) compute, layer by layer from the shards as in memory. In float64:
    the tiny models' Gram matrices (32 positions for up to 64 channels) are so ill-conditioned
    (condition numbers 1e8 to 1e18) that the float32 rounding of masked (in memory) and cut (low
    memory) blocks, 1e-7 relative in the propagated activations, moves the repaired weights by ~1e-4."""
    spec = FAMILIES[family]
    spec.build().save_pretrained(tmp_path / "dense")
    double = torch.float64
    settings = {
        **CALIBRATION,
        **_amounts(spec),
        "calibration": [calibration_images()[0].to(double)],
        "propagate": "pruned",
    }
    dense = HFPruner.from_pretrained(tmp_path / "dense", dtype=double)
    dense.prune(**settings)
    pruner = HFPruner.from_pretrained(tmp_path / "dense", low_memory=True, dtype=double)
    pruner.prune(**settings)
    assert pruner.report.layers == dense.report.layers
    want = load_pruned(dense.save_pretrained(tmp_path / "in_memory"), dtype=double).state_dict()
    got = load_pruned(pruner.save_pretrained(tmp_path / "low_memory"), dtype=double).state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("propagate", ["unpruned", "pruned"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_removing_the_first_block_of_a_convnext_stage_keeps_its_downsampling(
    tmp_path, one_thread, propagate, low_memory
):
    """Block 2 (the first of stage 1, after the downsampling layer) is the only one open to removal;
    the pruned model is the dense one without that block (plain torch below)."""
    spec = FAMILIES["convnext"]
    model = spec.build()
    model.save_pretrained(tmp_path / "dense")
    settings = {
        **_calibration(spec),
        "layers": 1,
        "protected_layers": (0, 1, 3),
        "criterion": "block_influence",
        "propagate": propagate,
    }
    pruner = HFPruner.from_pretrained(tmp_path / "dense", low_memory=low_memory)
    pruner.prune(**settings)
    assert [layer.keep_layer for layer in pruner.plan.layers] == [True, True, False, True]
    pruned = load_pruned(pruner.save_pretrained(tmp_path / "pruned"))
    del model.convnext.encoder.stages[1].layers[0]  # the reference: the block gone, its downsampling kept
    inputs = spec.inputs()
    with torch.no_grad():
        torch.testing.assert_close(pruned(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "case, extra",
    [
        ("heads+neurons/activation", {}),
        ("layers+neurons/obs+influence", {}),
        ("layers+neurons/obs+influence", {"refine_epochs": 2}),
    ],
)
def test_low_memory_carries_the_dense_stream_as_the_in_memory_prune_does(
    sharded_llama, tmp_path, one_thread, case, extra
):
    """`propagate="both"` with `low_memory=True` (refused before the layer-by-layer engine was shared):
    the plan and weights of the in-memory prune, whose layers stay whole and masked, where here each is
    read from the shards, cut and unloaded; and (plain torch) the refit toward the dense stream
    leaves the last hidden state closer to the dense model's than `propagate="pruned"` does."""
    settings = {**CALIBRATION, **CASES[case], **extra, "propagate": "both"}
    in_memory = HFPruner.from_pretrained(sharded_llama)
    expected_report = in_memory.prune(**settings)
    pruner = HFPruner.from_pretrained(sharded_llama, low_memory=True)
    report = pruner.prune(**settings)
    assert report.layers == expected_report.layers and report.parameters_after == expected_report.parameters_after
    assert report.calibration == expected_report.calibration
    want = load_pruned(in_memory.save_pretrained(tmp_path / "in_memory")).state_dict()
    got = load_pruned(pruner.save_pretrained(tmp_path / "low_memory")).state_dict()
    assert sorted(got) == sorted(want)
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=1e-5)

    windows = CALIBRATION["calibration"][0]  # the 8 windows of 16 tokens calibrated on
    with torch.no_grad():
        dense = AutoModelForCausalLM.from_pretrained(sharded_llama).model(windows).last_hidden_state
    pruned = HFPruner.from_pretrained(sharded_llama, low_memory=True)
    pruned.prune(**{**CALIBRATION, **CASES[case], "propagate": "pruned"})
    models = {"both": pruner.load_model(), "pruned": pruned.load_model()}
    with torch.no_grad():
        errors = {key: (m.model(windows).last_hidden_state - dense).pow(2).mean().item() for key, m in models.items()}
    assert errors["both"] < errors["pruned"]
