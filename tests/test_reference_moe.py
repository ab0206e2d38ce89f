"""scripts/make_reference_moe.py's MoEfication on a random tiny Llama: with every expert active the Mixtral
equals the dense model (the reference: the dense model itself), with top-k it runs, saves and reloads with
plain transformers, and the balanced clustering puts every neuron in exactly one equal-sized expert."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from script_modules import script_module
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_prune.calibration.data import DATA_DIR_VARIABLE
from hf_prune.errors import UnsupportedArchitectureError

EXPERTS = 4


@pytest.fixture(scope="module")
def moe_script():
    return script_module("make_reference_moe")


@pytest.fixture
def dense():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # an untrained MLP adds almost nothing: make it matter
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(20)
    return model


def test_all_experts_equal_the_dense_model(moe_script, dense):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    orders = [torch.randperm(64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    moe = moe_script.moefy(dense, EXPERTS, orders=orders)
    assert moe.config.num_local_experts == moe.config.num_experts_per_tok == EXPERTS
    without_mlp = copy.deepcopy(dense)
    with torch.no_grad():
        for layer in without_mlp.model.layers:
            layer.mlp.down_proj.weight.zero_()
        expected, got = dense(ids).logits, moe(ids).logits
        assert (expected - without_mlp(ids).logits).abs().max() > 0.1  # the MLPs matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_top_k_saves_and_reloads(moe_script, dense, tmp_path):
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    moe = moe_script.moefy(dense, EXPERTS, top_k=2)
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.normal_()
        before = moe(ids).logits
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "MixtralForCausalLM" and reloaded.config.num_experts_per_tok == 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=1e-5)
        # Top-2 of 4: each token gets half of the dense MLP, so the logits differ from the dense model's.
        assert (before - dense(ids).logits).abs().max() > 1e-3


def test_balanced_clusters_partition_the_neurons(moe_script):
    features = torch.nn.functional.normalize(torch.rand(64, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    order = moe_script.balanced_clusters(features, EXPERTS, seed=0)
    assert sorted(order.tolist()) == list(range(64))


def test_refuses_a_width_the_experts_do_not_divide(moe_script, dense):
    with pytest.raises(UnsupportedArchitectureError, match="experts must divide intermediate_size=64"):
        moe_script.mixtral_config(dense.config, 6, 2)


def test_scripts_end_to_end_on_a_tiny_model(smollm2, tmp_path):
    """Plumbing only (random 2-layer Llama, SmolLM2's tokenizer, real WikiText-2): the folder reloads with plain
    transformers and records its settings; the benchmark writes one row per criterion and resumes."""
    if not Path(os.environ.get(DATA_DIR_VARIABLE, "/nonexistent"), "wikitext-2").is_dir():
        pytest.skip(f"needs WikiText-2 under ${DATA_DIR_VARIABLE}")
    folder = tmp_path / "moe"
    make = script_module("make_reference_moe")
    argv = ["--model", "tiny", "--steps", "1", "--held-out", "1", "--init-windows", "1", "--output", str(folder)]
    info = make.main(argv)
    assert info["all_experts_max_logit_difference"] < 1e-5 and len(info["training_log"]) == 1
    recorded = json.loads((folder / "reference_moe.json").read_text())["settings"]
    assert recorded["top_k"] == 4 and recorded["split"] == "cluster"
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_local_experts == 8 and not reloaded.config.output_router_logits

    benchmark = script_module("benchmark_moe")
    argv = ["--model", str(folder), "--output", str(tmp_path / "moe.json"), "--windows", "1", "--num-samples", "2"]
    rows = benchmark.main([*argv, "--criteria", "output_error", "random", "--merge", "output_error"])
    assert set(rows) == {"dense", "experts/output_error", "experts/random", "experts/output_error+merge"}
    assert rows["experts/output_error"]["parameters"] < rows["dense"]["parameters"]
    assert rows["experts/output_error+merge"]["parameters"] == rows["experts/output_error"]["parameters"]
    again = benchmark.main([*argv, "--criteria", "output_error", "--merge"])  # resumed: nothing measured again
    assert again["experts/output_error"] == rows["experts/output_error"]
