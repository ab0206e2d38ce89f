"""The real SmolLM2-135M (GGUF from PyPI): prune, save, reload with plain transformers in a fresh
process, identical logits. 6 query heads divide hidden 576, so this plan must be vanilla."""

import json
import subprocess
import sys

import torch
from safetensors.torch import save_file

from hf_prune import HFPruner

RELOAD = """
import sys, torch, json
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
expected = load_file(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
print(json.dumps({"diff": (logits - expected["logits"]).abs().max().item(), "tied": tied,
                  "hf_prune_imported": "hf_prune" in sys.modules}))
"""


def test_smollm2_round_trip(smollm2, tmp_path):
    folder, kwargs = smollm2
    pruner = HFPruner.from_pretrained(folder, **kwargs)
    dense_params = sum(p.numel() for p in pruner.model.parameters())
    assert dense_params == 134_515_008
    # The default criteria and repair, on a small calibration set to keep the suite fast.
    report = pruner.prune(kv_groups=1, mlp_neurons=0.25, layers=4, num_samples=8)
    assert report.output_format == "vanilla", report.format_reason
    config = pruner.model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (26, 6, 2)
    assert (config.head_dim, config.intermediate_size) == (64, 1152)
    assert report.parameters_after == sum(p.numel() for p in pruner.model.parameters()) < dense_params

    out = pruner.save_pretrained(tmp_path / "smollm2-pruned")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    # The card says the weights were dequantized from the GGUF's 4-bit tensors (gguf.GGUFReader's tensor types).
    card = (out / "README.md").read_text()
    assert "**Source weights:** dequantized to float from the GGUF file `SmolLM2-135M-Instruct.Q4_1.gguf`" in card
    assert "Q4_1 " in card
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and "quantization_config" not in saved

    input_ids = pruner.tokenizer(
        "Structural pruning keeps the model dense but smaller.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        logits = pruner.model(input_ids).logits
    save_file({"input_ids": input_ids, "logits": logits}, str(tmp_path / "expected.safetensors"))
    process = subprocess.run(
        [sys.executable, "-c", RELOAD, str(out), str(tmp_path / "expected.safetensors")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result == {"diff": 0.0, "tied": True, "hf_prune_imported": False}
