"""Which output format a prune produces, and that both load back exactly."""

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES, STRUCTURAL
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from hf_prune import HFPruner, load_pruned
from hf_prune.groups import get_adapter
from hf_prune.output.checkpoint import decide_format, write_loader_config
from hf_prune.plan import PruningPlan
from hf_prune.surgery import apply_plan

# 8 query heads in 4 KV groups, hidden 64: removing one KV group leaves 6 heads, and 64 % 6 != 0.
SHAPE = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    intermediate_size=32,
    num_hidden_layers=2,
    vocab_size=50,
)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "config_class, model_class, expected",
    [(LlamaConfig, LlamaForCausalLM, "loader"), (MistralConfig, MistralForCausalLM, "vanilla")],
)
def test_head_pruning_is_vanilla_only_where_the_config_accepts_it(config_class, model_class, expected, tmp_path):
    torch.manual_seed(0)
    pruner = HFPruner(model_class(config_class(**SHAPE)).eval())
    report = pruner.prune(kv_groups=1, **STRUCTURAL)
    assert report.output_format == expected
    if expected == "loader":
        assert "hidden size (64) is not a multiple of the number of attention heads (6)" in report.format_reason
    ids = torch.randint(0, 50, (1, 5))
    out = pruner.save_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(load_pruned(out), ids), logits(pruner.model, ids), atol=0, rtol=0)


def test_loader_format_refuses_plain_transformers_without_trust_remote_code(tmp_path):
    pruner = HFPruner(FAMILIES["llama"].build())
    pruner.prune(attention_branches=1, **STRUCTURAL)
    out = pruner.save_pretrained(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "hf_prune" and config["hf_prune"]["base_model_type"] == "llama"
    assert [layer["attention"] for layer in config["hf_prune"]["layers"]].count(False) == 1
    # The folder carries remote code (auto_map), so transformers refuses before any shape is read.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(out)


def test_load_pruned_passes_from_pretrained_keywords(tmp_path):
    pruner = HFPruner(FAMILIES["gpt2"].build())
    pruner.prune(attention_heads=1, mlp_neurons=0.25, **STRUCTURAL)
    out = pruner.save_pretrained(tmp_path / "out")
    model = load_pruned(out, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert type(model).__name__ == "GPT2LMHeadModel"


def test_layers_of_different_sizes_use_the_loader_format(tmp_path):
    model = FAMILIES["qwen2"].build()
    reference = copy.deepcopy(model)
    adapter = get_adapter(model.config)
    plan = PruningPlan.keep_all(model, adapter)
    plan.layers[0].neurons = tuple(range(0, 48, 2))
    plan.layers[2].kv_heads, plan.layers[2].query_heads = (0, 2), (0, 1, 4, 5)
    plan.layers[3].query_heads = (0, 2, 4)
    apply_plan(model, adapter, plan)
    decision = decide_format(model, adapter)
    assert not decision.vanilla and "different head or neuron counts" in decision.reason

    model.save_pretrained(tmp_path / "out")
    write_loader_config(tmp_path / "out", model, adapter)
    reloaded = load_pruned(tmp_path / "out")
    sizes = [adapter.geometry(layer) for layer in adapter.layers(reloaded)]
    assert [g.intermediate_size for g in sizes] == [24, 48, 48, 48]
    assert [(g.attention.num_heads, g.attention.num_kv_heads) for g in sizes] == [(6, 3), (6, 3), (4, 2), (3, 3)]
    ids = torch.randint(3, 97, (2, 6))
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), atol=0, rtol=0)
    assert logits(reference, ids).shape == logits(model, ids).shape


def test_the_callers_config_object_is_never_modified():
    config = LlamaConfig(**SHAPE)
    shared = LlamaForCausalLM(config)
    pruner = HFPruner(shared)
    pruner.prune(layers=1, mlp_neurons=0.5, **STRUCTURAL)
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 32)
    assert (pruner.model.config.num_hidden_layers, pruner.model.config.intermediate_size) == (1, 16)
    assert all(m.config is pruner.model.config for m in pruner.model.modules() if hasattr(m, "config"))
