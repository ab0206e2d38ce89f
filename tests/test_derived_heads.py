"""Derived heads beyond the q/k/v layouts (issue 15): per-head parameters, per-head value norms, multi-head latent
attention read from the dataflow, and the typed refusals where heads are coupled or cannot be confirmed. Each
pruned model is checked against a plain-torch reference: its removed heads' output-projection columns zeroed."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from tiny_models import STRUCTURAL, calibration_windows

from hf_prune import HFPruner, load_pruned
from hf_prune.derivation.attention import fused_chunks
from hf_prune.derivation.derive import DerivedAdapter, build_tiny, model_output, tiny_config
from hf_prune.derivation.verify import random_plan, verified_derivation
from hf_prune.errors import DerivedAdapterError, InvalidPruningTargetError
from hf_prune.surgery import apply_plan


@torch.no_grad()
def heads_zeroed(model, plan, layers: str, out: str):
    """The reference in plain torch: each removed query head's columns of the output projection zeroed (the
    head width is the projection's input width over the layer's original head count)."""
    reference = copy.deepcopy(model)
    blocks = reference.get_submodule(layers)
    for layer_plan in plan.layers:
        weight = blocks[layer_plan.layer].get_submodule(out).weight
        width = weight.shape[1] // layer_plan.geometry.attention.num_heads
        for head in set(range(layer_plan.geometry.attention.num_heads)) - set(layer_plan.query_heads):
            weight[:, head * width : (head + 1) * width] = 0
    return reference


def prune_heads_against_reference(config_class, seed: int = 2) -> HFPruner:
    """Half the heads by magnitude (other heads in each layer); logits equal the zeroed reference."""
    dense, inputs = build_tiny(config_class, seed=seed)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    adapter = pruner.adapter
    assert isinstance(adapter, DerivedAdapter), type(adapter)
    assert len({p.query_heads for p in pruner.plan.layers}) > 1 or len(pruner.plan.layers) == 1
    reference = heads_zeroed(dense, pruner.plan, adapter.layers_name(dense), adapter.o_proj)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    return pruner


@pytest.mark.parametrize(
    "config_class, parameters",
    [
        # UMT5: a relative-position bias (buckets, n) in every block's self-attention
        (transformers.UMT5Config, {("layer.0.SelfAttention.relative_attention_bias.weight", 1)}),
        # attention sinks, one logit per head
        (transformers.GraniteSWAConfig, {("self_attn.sinks", 0)}),
    ],
)
def test_per_head_parameters_are_sliced_with_their_head(config_class, parameters):
    derivation = verified_derivation(config_class)
    assert "heads" in derivation.kinds, derivation.refused
    assert set(derivation.head_parameters) == parameters
    pruner = prune_heads_against_reference(config_class)
    for layer_plan, layer in zip(pruner.plan.layers, pruner.adapter.layers(pruner.model), strict=True):
        for name, dim in parameters:
            assert layer.get_parameter(name).shape[dim] == len(layer_plan.query_heads)


@pytest.mark.parametrize(
    "config_class, field, parameters",
    [
        # Swin: each block's relative-position bias table, `((2w - 1)², n)`, one column per head
        (transformers.SwinConfig, "num_heads", {("attention.relative_position_bias.relative_position_bias_table", 1)}),
        # SegFormer: keys and values spatially reduced first (a strided convolution and a LayerNorm of the stage
        # width, which stay whole)
        (transformers.SegformerConfig, "num_attention_heads", set()),
    ],
)
def test_stage_heads_counted_by_one_entry_of_a_per_stage_heads_list(tmp_path, config_class, field, parameters):
    """Hierarchical models count the pruned (last) stage's heads by the entry of a per-stage list at the stage's
    `depths` index (`num_heads[i]`). Half the heads of each block: the cut equals a plain-torch reference (the
    removed heads' output-projection columns zeroed), per-head parameters go with their heads, the config fields
    lower that one entry, and the folder reloads to the reference. The class derives the head size from the
    stage's width, so fewer heads of the same size are written in the loader format."""
    stage = len(tiny_config(config_class).depths) - 1
    derivation = verified_derivation(config_class)
    assert derivation.heads_field == f"{field}[{stage}]", derivation.heads_field
    assert {"heads", "neurons", "layers"} <= derivation.kinds, derivation.refused
    assert set(derivation.head_parameters) == parameters
    assert derivation.formats["heads"].startswith("loader"), derivation.formats
    dense, inputs = build_tiny(config_class, seed=2)
    # at least 64 pixels: the last stage sees several keys and values after SegFormer's spatial reduction
    size = max(64, inputs["pixel_values"].shape[-1])
    inputs = {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))}
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    adapter = pruner.adapter
    reference = heads_zeroed(dense, pruner.plan, adapter.layers_name(dense), adapter.o_proj)
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    heads = list(getattr(dense.config, field))
    dense_layers = adapter.layers(dense)
    for layer_plan, layer in zip(pruner.plan.layers, adapter.layers(pruner.model), strict=True):
        kept, old = len(layer_plan.query_heads), dense_layers[layer_plan.layer]
        assert 0 < kept < heads[stage]
        assert layer.get_submodule(adapter.o_proj).in_features * heads[stage] == (
            old.get_submodule(adapter.o_proj).in_features * kept
        )
        for name, dim in parameters:
            assert layer.get_parameter(name).shape[dim] == kept
        cut = {derivation.q_proj, derivation.k_proj, derivation.v_proj, derivation.o_proj} | {n for n, _ in parameters}
        whole = [
            (name, parameter)
            for name, parameter in old.named_parameters()
            if name.startswith(derivation.attention_module + ".") and not name.startswith(tuple(cut))
        ]
        # (a stage without reduction, `sr_ratios[stage] == 1`, has none: the tiny build keeps 4 stages on 5.18)
        reduced = config_class is transformers.SegformerConfig and dense.config.sr_ratios[stage] > 1
        assert bool(whole) == reduced, whole
        for name, parameter in whole:  # SegFormer's spatial reduction of keys and values stays whole
            torch.testing.assert_close(layer.get_parameter(name), parameter, atol=0, rtol=0)
    lowered = heads[:stage] + [len(pruner.plan.layers[0].query_heads)] + heads[stage + 1 :]
    geometry = adapter.geometry(adapter.layers(pruner.model)[0])
    assert adapter.config_fields(pruner.model.config, geometry)[field] == lowered
    pruner.save_pretrained(tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


def test_per_head_value_norm_keys_and_values_told_apart_by_name():
    """Gemma-4 normalises each head's values over its `d` channels: a value channel reaches its heads' columns
    like a key channel does; the names order them, and the cut is exact either way."""
    derivation = verified_derivation(transformers.Gemma4TextConfig)
    assert {"heads", "kv_groups"} <= derivation.kinds, derivation.refused
    assert (derivation.k_proj, derivation.v_proj) == ("self_attn.k_proj", "self_attn.v_proj")
    prune_heads_against_reference(transformers.Gemma4TextConfig)


@pytest.mark.parametrize("config_class", [transformers.DeepseekV3Config, transformers.MiniCPM3Config])
def test_multi_head_latent_attention_heads_read_from_the_dataflow(config_class):
    """MLA: a head is its chunk of `q_b_proj` rows (`d_nope + d_rope`), of `kv_b_proj` rows (`d_nope + d_v`) and
    its `d_v` columns of `o_proj`; the shared latent projections stay whole."""
    derivation = verified_derivation(config_class)
    assert {"heads", "kv_groups"} <= derivation.kinds, derivation.refused
    assert set(derivation.head_producers) == {"self_attn.q_b_proj", "self_attn.kv_b_proj"}
    assert derivation.head_count_attribute == "num_heads"
    pruner = prune_heads_against_reference(config_class)
    for layer_plan, layer in zip(pruner.plan.layers, pruner.adapter.layers(pruner.model), strict=True):
        kept, attention = len(layer_plan.query_heads), layer.self_attn
        assert attention.q_b_proj.out_features == kept * attention.qk_head_dim
        assert attention.kv_b_proj.out_features == kept * (attention.qk_nope_head_dim + attention.v_head_dim)
        assert attention.o_proj.in_features == kept * attention.v_head_dim
        assert attention.q_a_proj.out_features == pruner.model.config.q_lora_rank  # the latent stays whole


@pytest.mark.parametrize(
    "config_class, reason",
    [
        # OLMo-2 normalises keys over the whole n·d width: a key channel moves every head
        (transformers.Olmo2Config, "self_attn.k_proj, channel 17, reaches 32 columns of self_attn.o_proj outside"),
        # LUKE's entity-aware queries run only with entity inputs: their heads cannot be confirmed
        (transformers.LukeConfig, "attention.self.w2e_query, attention.self.e2w_query, attention.self.e2e_query"),
        # BLOOM's ALiBi is computed once from the head count and handed to every block
        (transformers.BloomConfig, "every block receives alibi (8, 1, 7) with one entry per head (4)"),
        # MPT's ALiBi slopes likewise: no parameter produces them, tying its heads is never tried
        (transformers.MptConfig, "every block receives position_bias (4, 1, 128) with one entry per head (4)"),
        # MRA's block-sparse attention returns zeros without its CUDA kernel: q/k/v reach nothing on the CPU
        (transformers.MraConfig, "attention.self.value, attention.output.dense (64→4×16, 4×16→64) reach none of"),
        # CodeGen's forward splits q/k/v into mp_num = 4 groups whatever the head count: one head cannot go alone
        (transformers.CodeGenConfig, "verification failed in attn"),
    ],
)
def test_heads_that_cannot_be_cut_alone_are_refused_with_the_reason(config_class, reason):
    derivation = verified_derivation(config_class)
    assert "heads" in derivation.refused and reason in derivation.refused["heads"], derivation.refused
    assert "neurons" in derivation.kinds


def test_tied_heads_are_drawn_and_kept_alike_in_every_layer():
    """Where the layers share per-head state, verification's random plan drops the same heads everywhere, and a
    plan keeping other heads in other layers is refused before any cut (a typed error saying why)."""
    model, _ = build_tiny(transformers.MPNetConfig)
    adapter = DerivedAdapter(verified_derivation(transformers.MPNetConfig), "mpnet")
    plan = random_plan(model, adapter, "heads")
    kept = {p.query_heads for p in plan.layers}
    assert len(kept) == 1 and len(next(iter(kept))) < plan.layers[0].geometry.attention.num_heads, kept
    plan.layers[1].query_heads = plan.layers[1].query_heads[1:]
    with pytest.raises(InvalidPruningTargetError, match="keep the same heads in every layer"):
        apply_plan(copy.deepcopy(model), adapter, plan)


def test_tied_heads_are_refused_where_layers_are_planned_one_at_a_time():
    """Layer-by-layer planning sees one layer's scores: it cannot choose one head set for all layers."""
    model, _ = build_tiny(transformers.CpmAntConfig)
    calibration = {"calibration": calibration_windows(), "num_samples": 8, "seq_len": 16, "batch_size": 4}
    with pytest.raises(InvalidPruningTargetError, match="share per-head state computed once for every layer"):
        HFPruner(model).prune(attention_heads=0.5, propagate="pruned", **STRUCTURAL, **calibration)


def test_verification_drops_other_heads_in_each_layer():
    """Shared per-head state (T5's position bias) shows only where layers keep different heads."""
    model, _ = build_tiny(transformers.LlamaConfig)
    adapter = DerivedAdapter(verified_derivation(transformers.LlamaConfig), "llama")
    for kind in ("heads", "kv_groups"):
        plan = random_plan(model, adapter, kind)
        kept = [(p.query_heads, p.kv_heads) for p in plan.layers]
        assert all(a != b for a, b in zip(kept, kept[1:])), (kind, kept)  # each layer unlike the one before
        assert all(len(q) < p.geometry.attention.num_heads for (q, _), p in zip(kept, plan.layers, strict=True))


@pytest.mark.skipif(not hasattr(transformers, "BeamConfig"), reason="Beam is not in this transformers release")
def test_per_head_output_gates_are_cut_with_their_query_head():
    """Beam gates each head's output by `σ(gate_proj(x) + gate_bias)`: the gate's channel of head 1 reaches its
    own column only (the query's every column of its head), so its rows and bias entry go with the query head."""
    derivation = verified_derivation(transformers.BeamConfig)
    assert {"heads", "kv_groups"} <= derivation.kinds, derivation.refused
    assert derivation.q_proj == "self_attn.q_proj" and derivation.query_gates == ("self_attn.gate_proj",)
    assert derivation.head_parameters == (("self_attn.gate_bias", 0),)
    pruner = prune_heads_against_reference(transformers.BeamConfig)
    for layer_plan, layer in zip(pruner.plan.layers, pruner.adapter.layers(pruner.model), strict=True):
        kept = len(layer_plan.query_heads)
        assert layer.self_attn.gate_proj.out_features == layer.self_attn.q_proj.out_features == kept * 24


def test_per_head_biases_of_the_query_width_are_cut_in_head_chunks():
    """DeBERTa adds `q_bias` and `v_bias` (`n·d` wide) per head after its fused q/k/v projection: entry `d + 1`
    reaches head 1's columns only, so each head takes its `d` entries; the attention's output LayerNorm, as wide
    (`n·d = H`), reaches nothing of the output projection's input and stays whole."""
    derivation = verified_derivation(transformers.DebertaConfig)
    assert "heads" in derivation.kinds, derivation.refused
    assert set(derivation.head_width_parameters) == {("attention.self.q_bias", 0), ("attention.self.v_bias", 0)}
    pruner = prune_heads_against_reference(transformers.DebertaConfig)
    for layer_plan, layer in zip(pruner.plan.layers, pruner.adapter.layers(pruner.model), strict=True):
        assert layer.attention.self.q_bias.shape == (16 * len(layer_plan.query_heads),)
        assert layer.attention.output.LayerNorm.weight.shape == (64,)


@pytest.mark.parametrize(
    "config_class, producer, reload_class",
    [
        # T5's relative-position bias lives in the first block (of the decoder stack derivation finds); every other
        # block reads the bias it gives. The encoder keeps its heads under the same `num_heads`: the loader format
        (
            transformers.T5Config,
            "transformer.decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            None,
        ),
        # MPNet's is computed once in the encoder and handed to every layer; its config derives the head size from
        # the head count (`hidden_size / num_attention_heads`), so fewer heads need the loader format too
        (transformers.MPNetConfig, "mpnet.encoder.relative_attention_bias.weight", None),
        # CPM-Ant's segment position bias, computed once in the model; `dim_head` is a field of its own, so the
        # config's head count holds the cut: plain transformers reloads it
        (transformers.CpmAntConfig, "cpmant.position_bias.relative_attention_bias", transformers.AutoModelForCausalLM),
    ],
)
def test_heads_sharing_a_position_bias_are_cut_alike_in_every_layer(config_class, producer, reload_class, tmp_path):
    """Per-head state computed once for every layer: head `j` of every layer is one group. Every layer keeps the
    same heads, the bias keeps their columns, the saved folder holds the cut, and the logits equal the dense
    model's with the removed heads' output-projection columns zeroed."""
    derivation = verified_derivation(config_class)
    assert derivation.tied_heads and "heads" in derivation.kinds, derivation.refused
    dense, inputs = build_tiny(config_class, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    adapter, kept = pruner.adapter, {p.query_heads for p in pruner.plan.layers}
    n = pruner.plan.layers[0].geometry.attention.num_heads
    assert len(kept) == 1 and len(next(iter(kept))) == n // 2, kept  # the same heads in every layer
    with torch.no_grad():  # the reference in plain torch: the removed heads' columns of each layer's output zeroed
        reference = copy.deepcopy(dense)
        for layer in reference.get_submodule(adapter.layers_name(dense)):
            weight = layer.get_submodule(adapter.o_proj).weight
            width = weight.shape[1] // n
            for head in set(range(n)) - set(next(iter(kept))):
                weight[:, head * width : (head + 1) * width] = 0
        expected = model_output(reference, inputs)
        torch.testing.assert_close(model_output(pruner.model, inputs), expected, atol=1e-5, rtol=0)
    assert pruner.model.get_parameter(producer).shape == (dense.get_parameter(producer).shape[0], n // 2)
    folder = pruner.save_pretrained(tmp_path / "out")
    if reload_class is None:
        reloaded = load_pruned(folder).eval()
    else:  # plain transformers: a vanilla folder whose config's head count is lowered
        reloaded = reload_class.from_pretrained(folder).eval()
        assert reloaded.config.num_attention_heads == n // 2
    for layer in reloaded.get_submodule(adapter.layers_name(dense)):
        assert layer.get_submodule(adapter.o_proj).in_features == n // 2 * width
    with torch.no_grad():
        torch.testing.assert_close(model_output(reloaded, inputs), expected, atol=1e-5, rtol=0)


def test_group_layouts_give_the_rows_the_forwards_split_by():
    """A fused layout of groups: CodeGen's forward reshapes the q/k/v rows into `mp_num = 4` groups, splits each
    into [q | v | k] of `n·d / 4` rows and reads heads in order (plain torch below); "blocked" is one group, and
    "grouped" one group per KV head, both in [q | k | v] order."""
    n, d, mp = 8, 3, 4
    rows = torch.arange(3 * n * d).reshape(mp, -1)
    query, value, key = (part.reshape(mp, n // mp, d).reshape(n, d) for part in rows.split(n * d // mp, dim=-1))
    chunks = fused_chunks("4:qvk", n, n)
    for expected, heads in zip((query, key, value), chunks, strict=True):
        assert [list(range(c * d, (c + 1) * d)) for c in heads] == expected.tolist()
    for n, m in ((8, 8), (8, 2), (4, 1)):
        assert fused_chunks("1:qkv", n, m) == fused_chunks("blocked", n, m)
        assert fused_chunks("m/1:qkv", n, m) == fused_chunks("grouped", n, m)
    with pytest.raises(DerivedAdapterError, match="do not split into its 4 groups"):
        fused_chunks("4:qvk", 7, 7)


@pytest.mark.parametrize("config_class", [transformers.XLMConfig, transformers.FlaubertConfig])
def test_heads_of_layers_kept_in_parallel_lists(config_class, tmp_path):
    """XLM (and FlauBERT) keep layer i's attention in `attentions[i]` and its MLP in `ffns[i]`: heads are found in
    the one, neurons in the other. Half the heads by magnitude equal the plain-torch reference (the removed heads'
    columns of `attentions[i].out_lin` zeroed); each attention's `n_heads` follows; the folder reloads to it."""
    derivation = verified_derivation(config_class)
    assert derivation.q_proj == "attentions.q_lin" and derivation.o_proj == "attentions.out_lin"
    assert {"heads", "neurons", "layers"} <= derivation.kinds, derivation.refused
    dense, inputs = build_tiny(config_class, seed=2)
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    assert len({p.query_heads for p in pruner.plan.layers}) > 1
    assert all(len(p.query_heads) == 2 for p in pruner.plan.layers)  # of 4
    reference = heads_zeroed(dense, pruner.plan, "transformer.attentions", "out_lin")
    with torch.no_grad():
        expected, pruned = reference(**inputs).logits, pruner.model(**inputs).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
    for layer_plan, attention in zip(pruner.plan.layers, pruner.model.transformer.attentions, strict=True):
        assert attention.n_heads == len(layer_plan.query_heads)
        assert attention.q_lin.out_features == attention.out_lin.in_features == 16 * attention.n_heads
    pruner.save_pretrained(tmp_path / "pruned")
    reloaded = load_pruned(tmp_path / "pruned").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.skipif(not hasattr(transformers, "DeepseekV32Config"), reason="no DeepSeek-V3.2 in this release")
def test_a_token_selector_the_attention_consults_stays_whole():
    """DeepSeek-V3.2's `indexer` picks the tokens each query attends to, from the hidden states and the shared
    query latent: it reads no head, so it stays whole and the heads are cut around it. With the indexer keeping
    3 of the 7 tokens (the sparse path, which changes the output), the cut equals the reference (removed heads'
    `o_proj` columns zeroed); Longformer's idle global projections, siblings of its q/k/v, stay refused."""
    derivation = verified_derivation(transformers.DeepseekV32Config)
    assert "heads" in derivation.kinds, derivation.refused
    dense, inputs = build_tiny(transformers.DeepseekV32Config, seed=2)
    with torch.no_grad():
        full = dense(**inputs).logits
        for layer in dense.model.layers:
            layer.self_attn.indexer.index_topk = 3
        assert not torch.allclose(dense(**inputs).logits, full, atol=1e-3)  # the selection matters
    pruner = HFPruner(copy.deepcopy(dense))
    pruner.prune(attention_heads=0.5, **STRUCTURAL)
    reference = heads_zeroed(dense, pruner.plan, pruner.adapter.layers_name(dense), pruner.adapter.o_proj)
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=0)
    for layer, old in zip(pruner.adapter.layers(pruner.model), dense.model.layers, strict=True):
        assert layer.self_attn.o_proj.in_features < old.self_attn.o_proj.in_features
        for name, parameter in old.self_attn.indexer.named_parameters():
            torch.testing.assert_close(layer.self_attn.indexer.get_parameter(name), parameter, atol=0, rtol=0)
    assert "heads" in verified_derivation(transformers.LongformerConfig).refused
