"""Derived adapters (issue 15): equal to the hand-written ones where both exist, refused when wrong,
and end to end for model types no file in hf_prune/groups names."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from tiny_models import FAMILIES, STRUCTURAL
from transformers.pytorch_utils import Conv1D

from hf_prune import HFPruner, load_pruned
from hf_prune.derivation.derive import MAX_TINY_PARAMETERS, DerivedAdapter, build_tiny, changed_fields, tiny_config
from hf_prune.derivation.verify import check_kinds, verified_derivation
from hf_prune.errors import DerivedAdapterError, InvalidPruningTargetError, UnsupportedArchitectureError
from hf_prune.groups import get_adapter
from hf_prune.groups.registry import _ADAPTERS
from hf_prune.masking import apply_masks
from hf_prune.tracing.pruner import mask_groups

RELOAD_SCRIPT = Path(__file__).with_name("reload_checkpoints.py")
#: Families with a hand-written adapter, and the kinds derivation must reproduce for each (post-LayerNorm
#: branches are refused by derivation, so not compared).
BOTH = {
    "llama": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},
    "mistral": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},
    "qwen2": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},
    "qwen3": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},
    # post-feedforward norm: the MLP output is not added to the stream unchanged
    "gemma3_text": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},
    "gpt2": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},  # fused, blocked
    "gpt_neox": {"heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers"},  # interleaved
    "bert": {"heads", "kv_groups", "neurons", "layers"},
}


def derived_for(config: transformers.PretrainedConfig) -> DerivedAdapter:
    """The derived adapter, hand-written one bypassed."""
    return DerivedAdapter(verified_derivation(type(config)), config.model_type)


@pytest.mark.parametrize("model_type", sorted(BOTH))
def test_derived_groups_equal_hand_written(model_type):
    model = FAMILIES[model_type].build()
    hand, derived = _ADAPTERS[model_type](), derived_for(model.config)
    assert BOTH[model_type] <= derived.kinds, derived.refused
    for kind in sorted(BOTH[model_type]):
        for index, layer in enumerate(hand.layers(model)):
            expected = hand.groups(layer, index, kind)
            assert expected, (kind, index)
            assert derived.groups(derived.layers(model)[index], index, kind) == expected, (model_type, kind, index)
    for hand_layer, derived_layer in zip(hand.layers(model), derived.layers(model), strict=True):
        # the removed-layer and stream repairs run only where the MLP output is added to the stream unchanged
        assert derived.mlp_writes_stream(derived_layer) == hand.mlp_writes_stream(hand_layer), model_type


def test_wrong_derivations_are_refused():
    """Query and key swapped, or a wrong head size: the cut cannot match the masked model, so the heads go."""
    derivation = verified_derivation(transformers.LlamaConfig)
    assert {"heads", "kv_groups", "neurons"} <= derivation.kinds
    model, inputs = build_tiny(transformers.LlamaConfig)
    swapped = dataclasses.replace(
        derivation, q_proj=derivation.k_proj, k_proj=derivation.q_proj, refused={}, formats={}
    )
    check_kinds(swapped, model, inputs, "llama")
    assert {"heads", "kv_groups"} <= set(swapped.refused) and "neurons" in swapped.kinds
    assert "self_attn" in swapped.refused["heads"]
    for layer in model.model.layers:
        layer.self_attn.wrong_head_dim = 8  # a third of the real head size of 24
    halved = dataclasses.replace(derivation, head_dim_attribute="wrong_head_dim", refused={}, formats={})
    check_kinds(halved, model, inputs, "llama")
    assert "heads" in halved.refused and "neurons" in halved.kinds and "layers" in halved.kinds
    mlp = dataclasses.replace(
        derivation, gate_proj=derivation.down_proj, down_proj=derivation.gate_proj, refused={}, formats={}
    )
    check_kinds(mlp, model, inputs, "llama")
    assert "neurons" in mlp.refused and "heads" in mlp.kinds


def test_fused_layouts_are_read_from_the_dataflow_and_a_wrong_one_is_refused():
    """GPT-NeoX interleaves [q_h k_h v_h] per head, GPT-2 blocks [q | k | v], GPT-BigCode is multi-query [q | k | v]
    with one KV head: each is read chunk by chunk. The other layout claimed for GPT-NeoX cuts the wrong rows,
    and verification refuses heads. CodeGen's `mp_num = 4` groups of [q v k] are read as such (a second instance
    with twice the heads shows a fixed count of groups, not one per head); its forward splits by 4 whatever the
    head count, so removing one head fails verification, which refuses heads saying so."""
    expected = {
        transformers.GPTNeoXConfig: "grouped",
        transformers.GPT2Config: "blocked",
        transformers.GPTBigCodeConfig: "blocked",
    }
    for config_class, layout in expected.items():
        derivation = verified_derivation(config_class)
        assert derivation.qkv_layout == layout and {"heads", "neurons", "layers"} <= derivation.kinds, derivation
    model, inputs = build_tiny(transformers.GPTNeoXConfig)
    wrong = dataclasses.replace(
        verified_derivation(transformers.GPTNeoXConfig), qkv_layout="blocked", refused={}, formats={}
    )
    check_kinds(wrong, model, inputs, "gpt_neox")
    assert "heads" in wrong.refused and "cut and masked outputs differ" in wrong.refused["heads"]
    assert {"neurons", "layers"} <= wrong.kinds
    codegen = verified_derivation(transformers.CodeGenConfig)
    assert codegen.qkv_layout == "4:qvk", codegen.refused
    assert "heads" in codegen.refused and "verification failed" in codegen.refused["heads"], codegen.refused


def test_nothing_derivable_is_a_typed_refusal():
    # one layer's weights shared by every layer: no list of blocks that a config field counts
    config = transformers.AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=37,
    )
    with pytest.raises(DerivedAdapterError, match="'albert' has no hand-written adapter.*no block list") as error:
        get_adapter(config)
    assert isinstance(error.value, UnsupportedArchitectureError)


def test_from_model_takes_the_derived_adapter_before_tracing():
    """A model in memory with a derivable config gets the derived adapter (heads, neurons, layers), even
    when example inputs for tracing are given; one that derives nothing is traced, or refused saying why."""
    opt, inputs = build_tiny(transformers.OPTConfig, seed=1)
    pruner = HFPruner.from_model(opt, example_inputs=inputs["input_ids"])
    assert type(pruner) is HFPruner and isinstance(pruner.adapter, DerivedAdapter)
    config = transformers.AlbertConfig(
        vocab_size=64,
        embedding_size=16,
        hidden_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        intermediate_size=37,
    )
    gpt = transformers.AlbertForMaskedLM(config)
    with pytest.raises(InvalidPruningTargetError, match="none could be derived.*Pass example_inputs=") as error:
        HFPruner.from_model(gpt)
    assert "no block list" in str(error.value)
    traced = HFPruner.from_model(gpt, example_inputs={"input_ids": torch.randint(0, 64, (1, 8))})
    assert type(traced).__name__ == "TracedPruner"


#: Model types without a hand-written adapter: config class, extra prune amounts beyond neurons and layers.
END_TO_END = {
    "opt": (transformers.OPTConfig, {}),
    "olmo": (transformers.OlmoConfig, {}),
    "cohere2": (transformers.Cohere2Config, {"kv_groups": 1}),
    "ernie4_5": (transformers.Ernie4_5Config, {"kv_groups": 1}),
    "nemotron": (transformers.NemotronConfig, {"kv_groups": 1}),
    "seed_oss": (transformers.SeedOssConfig, {"kv_groups": 1}),
    # built only since the shrink rule reads every size field (n_embd/dff; experts, MoE widths)
    "ctrl": (transformers.CTRLConfig, {}),
}


@functools.cache
def pruned_case(model_type: str, root: Path) -> dict:
    """Prune one tiny model through `HFPruner` (derived adapter), compare with the masked reference, save it."""
    config_class, extra = END_TO_END[model_type]
    dense, inputs = build_tiny(config_class, seed=3)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, layers=1, **extra, **STRUCTURAL)
    masked = copy.deepcopy(dense)
    apply_masks(masked, pruner.adapter, pruner.plan)
    with torch.no_grad():
        expected, pruned = masked(**inputs).logits, pruner.model(**inputs).logits
    pruner.save_pretrained(root / model_type / "model")
    save_file({"logits": expected.contiguous(), **inputs}, str(root / model_type / "expected.safetensors"))
    return {"pruner": pruner, "expected": expected, "pruned": pruned}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("derived")


@pytest.mark.parametrize("model_type", sorted(END_TO_END))
def test_end_to_end_without_hand_written_adapter(model_type, root):
    assert model_type not in _ADAPTERS
    case = pruned_case(model_type, root)
    assert isinstance(case["pruner"].adapter, DerivedAdapter)
    torch.testing.assert_close(case["pruned"], case["expected"], atol=1e-5, rtol=0)
    assert case["pruner"].report.output_format == "vanilla"
    assert case["pruner"].model.config.num_hidden_layers == 2


@pytest.mark.parametrize("config_class", [transformers.Qwen3MoeConfig, transformers.Glm4MoeConfig])
def test_mixture_of_experts_verified(config_class):
    """Built only since the shrink caps experts and their widths: heads, KV groups, routed experts, the neurons
    inside them and whole MoE blocks verify (cut == masked, reload equal; tests/test_experts.py checks them
    against plain torch), layers where the config builds every layer alike. GLM-4-MoE's router carries a
    per-expert score-correction buffer, cut with its rows."""
    derivation = verified_derivation(config_class)
    expected = {"heads", "kv_groups", "experts", "neurons", "attention_branches", "mlp_branches", "layers"}
    # GLM-4-MoE's layer 0 is dense (first_k_dense_replace): removing it leaves a config that builds the next, MoE,
    # layer as dense, so that folder is written in the loader format, which builds the dense stack and drops
    # layer 0 again (`layer_dependence`): no layer is kept whole
    assert not derivation.fixed_prefix
    assert set(derivation.kinds) == expected, derivation.refused


#: Fields a tiny model may not use (cross-attention stacks of a decoder-only head, a dense width of an all-MoE
#: model) or that bound the computation, not a weight (head counts when `d = H / n`, rotary positions).
NOT_WEIGHTS = ("head", "position", "layers", "intermediate", "ffn", "expert", "group")
#: Integer fields that are no size (ids, indices, windows), left as they are by design.
NO_SIZE = ("token", "_id", "index", "window", "seed", "length", "chunk", "bucket", "distance")


def _int_fields(values: dict, path: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _int_fields(value, f"{path}{key}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield path + key, value


@pytest.mark.parametrize(
    "config_class",
    [transformers.Qwen3MoeConfig, transformers.CTRLConfig, transformers.BartConfig, transformers.DeepseekV3Config],
)
def test_shrink_rule_changes_only_size_fields_and_stays_under_the_cap(config_class):
    """Independent checks with plain torch: the built tiny model is under the cap; no integer field the rule
    left large (> 128, not an id or a window) is a dimension of any parameter (nothing missed); and every
    field it changed either sizes a weight (restored alone to its default, the meta-built model grows) or
    is one a tiny model may not use or that bounds computation only."""
    model, _ = build_tiny(config_class)
    shapes = [p.shape for p in model.parameters()]
    assert sum(s.numel() for s in shapes) <= MAX_TINY_PARAMETERS
    dims = {d for s in shapes for d in s}
    for path, value in _int_fields(model.config.to_dict()):
        if value > 128 and not any(part in path for part in NO_SIZE):
            assert value not in dims, (path, value)
    model_class, tiny, changed = type(model), tiny_config(config_class), changed_fields(config_class)

    def meta_count(config):
        with torch.device("meta"):
            return sum(p.numel() for p in model_class(config).parameters())

    base, scaling = meta_count(tiny), []
    for path, (default, small) in changed.items():
        assert default > small > 0, (path, default, small)
        restored = copy.deepcopy(tiny)
        *parents, name = path.split(".")
        setattr(functools.reduce(getattr, parents, restored), name, default)
        if meta_count(restored) > base:
            scaling.append(path)
        else:
            assert any(part in name for part in NOT_WEIGHTS), (path, default, small)
    assert len(scaling) >= 3, scaling


def test_derived_folders_reload_with_plain_transformers(root):
    """One fresh process reloads every folder with AutoModelForCausalLM, hf_prune never imported."""
    for model_type in END_TO_END:
        pruned_case(model_type, root)
    process = subprocess.run(
        [sys.executable, str(RELOAD_SCRIPT), "AutoModelForCausalLM", str(root)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stdout + process.stderr
    results = json.loads(process.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(END_TO_END)
    for model_type, outcome in results.items():
        assert outcome["format"] == "vanilla" and outcome["max_abs_diff"] <= 1e-5, (model_type, outcome)


def test_encoder_decoder_layer_removal_updates_the_decoder_count():
    """BART's causal LM is its decoder stack: removing a layer changes `decoder_layers` (the field named like
    `decoder.layers`), not `encoder_layers` (which `num_hidden_layers` aliases); verified with a reload."""
    derivation = verified_derivation(transformers.BartConfig)
    assert derivation.layers_path == "decoder.layers" and "layers" in derivation.kinds, derivation.refused
    config = tiny_config(transformers.BartConfig)
    DerivedAdapter(derivation, "bart").update_config_for_layers(config, [0, 2])
    assert (config.decoder_layers, config.encoder_layers) == (2, 3)


def skipped(module, args, kwargs, output):
    """A removed block's output: its input, in the container the block returns."""
    hidden = args[0] if args else kwargs["hidden_states"]
    return type(output)([hidden, *output[1:]]) if isinstance(output, (tuple, list)) else hidden


@torch.no_grad()
def zeroed_reference(model, plan, layers: str, down: str, out: str, head_dim: int):
    """The pruned model's reference in plain torch: a removed neuron's down-projection column and a removed
    query head's output-projection columns zeroed, a removed layer's forward replaced by its input."""
    reference = copy.deepcopy(model)
    blocks = reference.get_submodule(layers)
    for layer_plan in plan.layers:
        block = blocks[layer_plan.layer]
        if not layer_plan.keep_layer:
            block.register_forward_hook(skipped, with_kwargs=True)
            continue
        if down and layer_plan.neurons:  # the MLP's shape is known (its kinds not refused)
            weight = block.get_submodule(down).weight
            weight[:, [n for n in range(weight.shape[1]) if n not in layer_plan.neurons]] = 0
        if out and layer_plan.query_heads:  # GPT-2 style Conv1D holds its weight as (in, out)
            module = block.get_submodule(out)
            weight = module.weight.T if isinstance(module, Conv1D) else module.weight
            for head in set(range(weight.shape[1] // head_dim)) - set(layer_plan.query_heads):
                weight[:, head * head_dim : (head + 1) * head_dim] = 0
    return reference


def test_multimodal_wrapper_prunes_its_language_model(tmp_path):
    """Gemma-3's multimodal model has no layer count of its own (`text_config`, `vision_config`): of its two
    stacks (SigLIP's encoder, the language model) the one whose last block runs last on text inputs is pruned,
    counted by `text_config.num_hidden_layers` (lowering it shortens that stack alone). Heads, KV groups,
    neurons and a layer: the cut equals a plain-torch reference and the folder reloads with plain
    transformers, vision tower untouched."""
    derivation = verified_derivation(transformers.Gemma3Config)
    assert (derivation.layers_path, derivation.layers_field, derivation.config_path) == (
        "language_model.layers",
        "text_config.num_hidden_layers",
        "text_config",
    )
    assert {"heads", "kv_groups", "neurons", "layers"} <= derivation.kinds, derivation.refused
    dense, inputs = build_tiny(transformers.Gemma3Config, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, kv_groups=1, layers=1, **STRUCTURAL)
    layers = "model.language_model.layers"
    reference = zeroed_reference(dense, pruner.plan, layers, "mlp.down_proj", "self_attn.o_proj", 24)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    text, vision = pruner.model.config.text_config, pruner.model.config.vision_config
    assert (text.num_hidden_layers, text.intermediate_size, text.num_key_value_heads) == (2, 30, 1)
    assert vision.to_dict() == dense.config.vision_config.to_dict()
    pruner.save_pretrained(tmp_path / "gemma3")
    assert pruner.report.output_format == "vanilla"
    reloaded = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "gemma3").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_encoder_decoder_stack_and_count_field_from_the_config_class():
    """UMT5's sequence classifier runs an encoder and a decoder stack of one length: the decoder runs last and
    `num_decoder_layers` (not `num_layers`, the encoder's) shortens it alone; removing a layer updates that."""
    derivation = verified_derivation(transformers.UMT5Config)
    assert (derivation.layers_path, derivation.layers_field) == ("decoder.block", "num_decoder_layers")
    assert {"neurons", "layers"} <= derivation.kinds, derivation.refused
    config = tiny_config(transformers.UMT5Config)
    DerivedAdapter(derivation, "umt5").update_config_for_layers(config, [1, 2])
    assert (config.num_decoder_layers, config.num_layers) == (2, 3)


def test_fused_gate_up_projection_read_from_the_dataflow(tmp_path):
    """GLM's MLP is one `gate_up_proj` (H → 2I) and `down_proj`; Moshi's `fc1` is the same with `ffn_dim` counting
    its 2I rows. Which rows feed neuron n (n and I + n) is read from the dataflow: the cut equals a plain-torch
    reference (the removed neurons' down columns zeroed) and reloads with plain transformers."""
    moshi = verified_derivation(transformers.MoshiConfig)
    assert (moshi.up_proj, moshi.gate_up_layout, moshi.mlp_width_scale) == ("mlp.fc1", "halves", 2), moshi
    assert "neurons" in moshi.kinds, moshi.refused
    derivation = verified_derivation(transformers.GlmConfig)
    assert (derivation.up_proj, derivation.gate_proj, derivation.gate_up_layout) == (
        "mlp.gate_up_proj",
        None,
        "halves",
    )
    dense, inputs = build_tiny(transformers.GlmConfig, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, **STRUCTURAL)
    reference = zeroed_reference(dense, pruner.plan, "model.layers", "mlp.down_proj", "self_attn.o_proj", 24)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    assert pruner.model.config.intermediate_size == 30
    assert pruner.model.model.layers[0].mlp.gate_up_proj.weight.shape == (60, 64)
    pruner.save_pretrained(tmp_path / "glm")
    assert pruner.report.output_format == "vanilla"
    reloaded = transformers.GlmForCausalLM.from_pretrained(tmp_path / "glm").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config_class, down, out",
    [(transformers.GPTNeoConfig, "mlp.c_proj", "attn.attention.out_proj"), (transformers.OpenAIGPTConfig, "", "")],
)
def test_layer_removal_where_blocks_index_the_cache_by_layer_id_or_return_lists(config_class, down, out):
    """GPT-Neo's attention indexes the KV cache by `layer_id` (renumbered with `layer_idx`), OpenAI GPT's blocks
    return a list (the masked reference passes its input on in a list): removing a layer equals a plain-torch
    reference that skips it, and GPT-Neo still generates with its cache."""
    dense, inputs = build_tiny(config_class, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(layers=1, **STRUCTURAL)
    layers = "transformer.h"
    reference = zeroed_reference(dense, pruner.plan, layers, down, out, 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    assert len(pruner.model.get_submodule(layers)) == 2
    if config_class is transformers.GPTNeoConfig:
        assert [block.attn.attention.layer_id for block in pruner.model.transformer.h] == [0, 1]
        pruner.model.generate(inputs["input_ids"], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize(
    "config_class, layers, out, width_attributes",
    [
        (transformers.BartConfig, "model.decoder.layers", "self_attn.out_proj", ("split_size", "all_head_size")),
        (transformers.XGLMConfig, "model.layers", "self_attn.out_proj", ("split_size", "all_head_size", "embed_dim")),
        # fused q/k/v (c_attn): its `embed_dim` follows the heads as in every fused layout
        (transformers.OpenAIGPTConfig, "transformer.h", "attn.c_proj", ("split_size", "all_head_size", "embed_dim")),
    ],
)
def test_self_attention_heads_beside_cross_attention_and_without_a_head_size_attribute(
    config_class, layers, out, width_attributes
):
    """BART's decoder block holds a self- and a cross-attention of one shape: the heads are read from the
    self-attention's projections alone. XGLM reshapes its output by `embed_dim`, which verification finds must
    follow the heads (tried after the cut without it differs); OpenAI GPT splits by `width // n_head` and keeps
    no head size. Removing half the heads
    equals a plain-torch reference with their output-projection columns zeroed."""
    derivation = verified_derivation(config_class)
    assert "heads" in derivation.kinds, derivation.refused
    assert derivation.o_proj == out and derivation.width_attributes == width_attributes
    dense, inputs = build_tiny(config_class, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    assert all(len(p.query_heads) == 2 for p in pruner.plan.layers)
    reference = zeroed_reference(dense, pruner.plan, layers, "", out, 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


def test_leading_layer_built_unlike_the_rest_is_removed_through_the_dense_stack(tmp_path):
    """ModernBERT builds its first layer without an attention norm: removing it cannot be expressed by a config
    with fewer layers (that config builds the new first layer without its norm), so the folder is written in the
    loader format, which builds the dense stack and drops layer 0 again; the first layer is then removable like
    any other (no fixed prefix). The cut equals a plain-torch reference that skips it, and the folder reloads
    to it with the kept layer's norm."""
    derivation = verified_derivation(transformers.ModernBertConfig)
    assert not derivation.fixed_prefix and "layers" in derivation.kinds, derivation.refused
    dense, inputs = build_tiny(transformers.ModernBertConfig, seed=2)
    assert dense.model.layers[0].attn_norm.__class__.__name__ == "Identity"
    with torch.no_grad():
        for layer in dense.model.layers[:1]:  # the lowest magnitude: chosen first
            for parameter in layer.parameters():
                parameter.mul_(1e-3)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(layers=1, **STRUCTURAL)
    assert [p.keep_layer for p in pruner.plan.layers] == [False, True, True]
    reference = zeroed_reference(dense, pruner.plan, "model.layers", "", "", 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    pruner.save_pretrained(tmp_path / "modernbert")
    saved = json.loads((tmp_path / "modernbert" / "config.json").read_text())
    assert saved["model_type"] == "hf_prune" and saved["hf_prune"]["dense_layers"]["kept"] == [1, 2]
    reloaded = load_pruned(tmp_path / "modernbert").eval()
    assert reloaded.model.layers[0].attn_norm.__class__.__name__ != "Identity"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_tiny_inputs_the_forward_needs_come_from_the_config_class():
    """ESM leaves `pad_token_id` unset and its forward counts the tokens that are not padding; X-MOD needs a
    `default_language` of its `languages`; MarkupLM's xpath pad ids index tables the shrink made smaller;
    SigLIP-2 takes patch-packed pixels, which its own image processor prepares. The
    tiny instance fills the unset defaults only after the forward refused them and keeps the ids inside their
    tables. ESM's heads and neurons then cut equal to a plain-torch reference with their output columns
    zeroed; its layers verify in the loader format (the contact head is sized by layers × heads: the folder
    builds the dense stack and drops the removed layers again)."""
    markup = tiny_config(transformers.MarkupLMConfig)
    assert markup.tag_pad_id < markup.max_xpath_tag_unit_embeddings
    assert markup.subs_pad_id < markup.max_xpath_subs_unit_embeddings
    xmod, _ = build_tiny(transformers.XmodConfig)
    assert xmod.config.default_language == transformers.XmodConfig().languages[0]
    siglip2, pixels = build_tiny(transformers.Siglip2Config)  # patch-packed pixels from its image processor
    patch = siglip2.config.vision_config.patch_size
    assert pixels["pixel_values"].shape[-1] == 3 * patch * patch and {"spatial_shapes", "pixel_attention_mask"} <= set(
        pixels
    )
    derivation = verified_derivation(transformers.EsmConfig)
    assert {"heads", "neurons", "layers"} <= derivation.kinds, derivation.refused
    assert derivation.formats["layers"].startswith("loader: esm.contact_head.regression.weight")
    dense, inputs = build_tiny(transformers.EsmConfig, seed=2)
    assert transformers.EsmConfig().pad_token_id is None and dense.config.pad_token_id is not None
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, attention_heads=0.5, **STRUCTURAL)
    reference = zeroed_reference(dense, pruner.plan, "esm.encoder.layer", "output.dense", "attention.output.dense", 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    assert all(len(p.query_heads) == 2 and len(p.neurons) == 30 for p in pruner.plan.layers)


@pytest.mark.parametrize(
    "config_class, attribute",
    [(transformers.DiffLlamaConfig, "self_attn.lambda_init"), (transformers.MiniCPM3Config, "residual_scale")],
)
def test_layer_removal_where_blocks_are_built_from_their_index_or_the_layer_count(tmp_path, config_class, attribute):
    """DiffLlama's attention sets `lambda_init` from its layer index, MiniCPM-3's block its residual scale from
    the layer count: a config with fewer layers builds other blocks, so the folder is written in the loader
    format, which builds the dense stack and drops the same layers. The cut and the reloaded folder equal a
    plain-torch reference that skips the removed layer, and the kept blocks keep their attribute."""
    dense, inputs = build_tiny(config_class, seed=2)
    with torch.no_grad():
        for parameter in dense.model.layers[0].parameters():  # the lowest magnitude: the later ones renumbered
            parameter.mul_(1e-3)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(layers=1, **STRUCTURAL)
    removed = [p.layer for p in pruner.plan.layers if not p.keep_layer]
    assert removed == [0]
    reference = zeroed_reference(dense, pruner.plan, "model.layers", "", "", 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    pruner.save_pretrained(tmp_path / "pruned")
    saved = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert saved["model_type"] == "hf_prune", "a config with fewer layers builds other blocks: not vanilla"
    assert saved["hf_prune"]["dense_layers"]["kept"] == [i for i in range(3) if i not in removed]
    reloaded = load_pruned(tmp_path / "pruned").eval()
    kept = [i for i in range(3) if i not in removed]
    for block, index in zip(reloaded.model.layers, kept, strict=True):
        original = dense.model.layers[index].get_submodule(attribute.rpartition(".")[0])
        attribute_name = attribute.rpartition(".")[2]
        assert getattr(block.get_submodule(attribute.rpartition(".")[0]), attribute_name) == getattr(
            original, attribute_name
        )
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "config_class, channels",
    [
        (transformers.SwinConfig, ()),
        (transformers.SegformerConfig, ("mlp.dwconv.dwconv",)),
        (transformers.PvtConfig, ()),
    ],
)
def test_hierarchical_stage_counted_by_one_entry_of_a_depth_list(tmp_path, config_class, channels):
    """Swin, SegFormer and PVT keep each stage's blocks in their own list, counted by one entry of `depths`
    (SegFormer's list of stages is no stack: its blocks see different widths; PVT's list of per-stage lists
    neither); the last stage is pruned, its MLP sized by its own stream width, SegFormer's depthwise
    convolution between the two projections sliced with the neurons.
    Neurons and a layer: the cut equals a plain-torch reference (removed neurons' down-projection columns zeroed,
    the removed block skipped) and the folder reloads to it, with `depths` lowered in that entry only."""
    stage = len(tiny_config(config_class).depths) - 1  # the last stage (the tiny build may keep fewer stages)
    derivation = verified_derivation(config_class)
    assert derivation.layers_field == f"depths[{stage}]", derivation.layers_field
    assert {"neurons", "layers"} <= derivation.kinds, derivation.refused
    assert derivation.neuron_channels == channels
    dense, inputs = build_tiny(config_class, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, layers=1, **STRUCTURAL)
    adapter = pruner.adapter
    layers = adapter.layers_name(dense)
    reference = zeroed_reference(dense, pruner.plan, layers, derivation.down_proj, "", 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    depths = list(dense.config.depths)
    depths[stage] -= 1
    assert list(pruner.model.config.depths) == depths and len(pruner.model.get_submodule(layers)) == depths[stage]
    for name in channels:  # the depthwise kernels went with their neurons
        width = adapter.intermediate_size(adapter.layers(pruner.model)[0])
        assert adapter.layers(pruner.model)[0].get_submodule(name).weight.shape[0] == width
    pruner.save_pretrained(tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_layers_kept_in_parallel_lists_are_removed_from_every_list(tmp_path):
    """XLM keeps each layer's parts in parallel lists (`attentions`, `layer_norm1`, `ffns`, `layer_norm2`), all
    counted by `n_layers`: a layer is entry i of each. Removing one equals a plain-torch reference that deletes
    entry i from the four lists and lowers the model's own `n_layers`; the folder reloads to it."""
    derivation = verified_derivation(transformers.XLMConfig)
    assert derivation.parallel_lists == ("attentions", "layer_norm1", "ffns", "layer_norm2")
    assert {"neurons", "layers"} <= derivation.kinds, derivation.refused
    dense, inputs = build_tiny(transformers.XLMConfig, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(layers=1, **STRUCTURAL)
    (removed,) = [p.layer for p in pruner.plan.layers if not p.keep_layer]
    reference = copy.deepcopy(dense)
    for name in ("attentions", "layer_norm1", "ffns", "layer_norm2"):
        entries = getattr(reference.transformer, name)
        setattr(reference.transformer, name, torch.nn.ModuleList(m for i, m in enumerate(entries) if i != removed))
    reference.transformer.n_layers -= 1
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    assert pruner.model.config.n_layers == 2
    pruner.save_pretrained(tmp_path / "xlm")
    reloaded = load_pruned(tmp_path / "xlm").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_shrink_variants_where_the_class_refuses_the_plain_shrink():
    """One change at a time where the plain shrink is refused, each checked against the class's own defaults:
    Hiera keeps its per-stage width multiplier (capped, its widths vanish), NeoMME's per-layer pattern keeps its
    last entries (it must hold a full-attention layer), MobileViT's stage widths stay multiples of its heads;
    Swin's doubling stages get a narrower hidden size and a larger image (its windows must fit the last stage).
    Every tiny model is under the cap and runs its inputs."""
    defaults = {c: c().to_dict() for c in (transformers.HieraConfig, transformers.NeoMMEConfig)}
    for config_class in (
        transformers.HieraConfig,
        transformers.NeoMMEConfig,
        transformers.MobileViTConfig,
        transformers.SwinConfig,
    ):
        model, inputs = build_tiny(config_class)
        assert sum(p.numel() for p in model.parameters()) <= MAX_TINY_PARAMETERS
        with torch.no_grad():
            assert torch.isfinite(model(**inputs).logits).all()
        config = model.config
        if config_class is transformers.HieraConfig:
            assert config.embed_dim_multiplier == defaults[config_class]["embed_dim_multiplier"] > 1
        elif config_class is transformers.NeoMMEConfig:
            count = config.num_hidden_layers
            assert config.layer_types == defaults[config_class]["layer_types"][-count:]
            assert "full_attention" in config.layer_types
        elif config_class is transformers.MobileViTConfig:
            assert all(width % config.num_attention_heads == 0 for width in config.hidden_sizes)
        else:
            assert config.embed_dim < 64 and inputs["pixel_values"].shape[-1] > 64


def test_layers_whose_removal_the_config_refuses_are_kept_whole(tmp_path):
    """NeoMME's `layer_types` must keep a full-attention layer: the tiny instance's only one is kept whole even
    where it scores lowest, another is removed; the cut equals a plain-torch reference that skips it, and the
    folder reloads to it."""
    dense, inputs = build_tiny(transformers.NeoMMEConfig, seed=2)
    full = dense.config.layer_types.index("full_attention")
    assert dense.config.layer_types.count("full_attention") == 1
    with torch.no_grad():
        for parameter in dense.model.layers[full].parameters():  # the lowest magnitude: chosen first were it free
            parameter.mul_(1e-3)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(layers=1, **STRUCTURAL)
    assert pruner.plan.layers[full].keep_layer and sum(not p.keep_layer for p in pruner.plan.layers) == 1
    reference = zeroed_reference(dense, pruner.plan, "model.layers", "", "", 16)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    pruner.save_pretrained(tmp_path / "neomme")
    reloaded = load_pruned(tmp_path / "neomme").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("config_class", [transformers.LayoutLMv3Config, transformers.LiltConfig])
def test_proportional_shrink_keeps_widths_that_split_the_hidden_size(tmp_path, config_class):
    """LayoutLMv3 concatenates 4 coordinate and 2 shape embeddings into the hidden size, LiLT splits its layout
    stream into sixths: the plain shrink (hidden 64, every unplaced width 64) gives shapes its forward refuses,
    so the last attempt is the proportional shrink (hidden 96, unplaced widths that divide the default hidden
    size keep their share). Neurons and a layer: the cut equals a plain-torch reference with the removed
    neurons' down-projection columns zeroed and the removed layer skipped, and the folder reloads to it."""
    defaults = config_class().to_dict()
    dense, inputs = build_tiny(config_class, seed=2)
    config = dense.config
    assert config.hidden_size == 96
    if config_class is transformers.LayoutLMv3Config:  # 128 of 768 → 16 of 96, computed here independently
        assert config.coordinate_size == defaults["coordinate_size"] * 96 // defaults["hidden_size"] == 16
        assert 4 * config.coordinate_size + 2 * config.shape_size == config.hidden_size
    derivation = verified_derivation(config_class)
    assert {"neurons", "layers"} <= set(derivation.kinds)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(mlp_neurons=0.25, layers=1, **STRUCTURAL)
    assert sum(not p.keep_layer for p in pruner.plan.layers) == 1
    layers = f"{dense.base_model_prefix}.{derivation.layers_path}"
    reference = zeroed_reference(dense, pruner.plan, layers, derivation.down_proj, "", 24)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    folder = tmp_path / config.model_type
    pruner.save_pretrained(folder)
    reloaded = load_pruned(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_channel_shrink_builds_convolutional_classifiers_the_plain_shrink_breaks():
    """The last shrink (`ShrinkRule.channels`) for convolutional configs whose widths live outside the per-stage
    lists. The relations each forward needs, computed here from the class defaults: HGNetV2's stem opens with
    the image's 3 channels; TextNet's `stem_out_channels` is its first stage width; EfficientNet's `hidden_dim`
    is `round_filters(1280)`, 1280 times the width coefficient. HGNetV2 and EfficientNet then prune traced
    channels, and the cut equals the masked dense model."""
    text = build_tiny(transformers.TextNetConfig)[0].config
    assert text.stem_num_channels == 3 and text.stem_out_channels == text.hidden_sizes[0] < 64
    for config_class in (transformers.HGNetV2Config, transformers.EfficientNetConfig):
        dense, inputs = build_tiny(config_class, seed=2)
        config = dense.config
        if config_class is transformers.HGNetV2Config:
            assert config.stem_channels[0] == config.num_channels == 3
            assert config.stem_channels[-1] == config.stage_in_channels[0]
        else:
            assert config.hidden_dim == 1280 * config.width_coefficient < config_class().hidden_dim
        pruner = HFPruner.from_model(copy.deepcopy(dense), example_inputs=inputs)
        report = pruner.prune(channels=0.25, criterion="magnitude")
        assert report.parameters_after < report.parameters_before
        mask_groups(dense, pruner.removed)
        with torch.no_grad():
            torch.testing.assert_close(pruner.model(**inputs).logits, dense(**inputs).logits, atol=1e-5, rtol=0)
