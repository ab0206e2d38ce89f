"""Dependency groups traced from the computation graph (hf_prune.tracing), on tiny models:
the traced groups equal the adapters' groups, the cut equals the masked model, unknown ops are
reported instead of pruned, and a traced prune saves and loads without pickles."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import FAMILIES
from torch import nn

import hf_prune
from hf_prune import HFPruner, PruningConfig
from hf_prune.errors import InvalidPruningTargetError, OutputExistsError, TracingError
from hf_prune.groups import get_adapter
from hf_prune.tracing.groups import merge_slices
from hf_prune.tracing.pruner import TracedPruner, mask_groups


class SmallCNN(nn.Module):
    """Conv-BN stem, a residual block, a depthwise conv, a flatten before the classifier."""

    def __init__(self, width: int = 12):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.inner = nn.Sequential(nn.Conv2d(width, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.outer = nn.Sequential(nn.Conv2d(16, width, 3, padding=1), nn.BatchNorm2d(width))
        self.depthwise = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, groups=width),
            nn.GroupNorm(width, width),
        )
        self.head = nn.Linear(width * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.outer(self.inner(x)))
        x = nn.functional.adaptive_avg_pool2d(self.depthwise(x), 2)
        return self.head(x.flatten(1))


class SortsChannels(SmallCNN):
    """Sorts the residual channels: an op the tracer does not know."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.sort(x + self.outer(self.inner(x)), dim=1).values
        return self.head(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def build(cls=SmallCNN, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls().eval()
    with torch.no_grad():  # trained-looking BatchNorm statistics, so masking bugs show
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                module.weight.normal_()
                module.bias.normal_()
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2)
    return model


IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def _normalised(slices, prefix: str = "") -> frozenset:
    from hf_prune.groups import TensorSlice

    renamed = [TensorSlice(prefix + p.parameter, p.dim, p.start, p.stop, p.consumer) for p in slices]
    return frozenset(merge_slices(renamed))


@pytest.mark.parametrize("family", ["llama", "bert", "vit"])
def test_traced_groups_equal_the_adapters_groups(family, one_thread):
    tiny = FAMILIES[family]
    model = tiny.build()
    inputs = tiny.inputs(1, 5)
    if tiny.causal:
        inputs["use_cache"] = False
    traced = TracedPruner(model, inputs).traced
    adapter = get_adapter(model.config)
    prefix = adapter.layers_name(model)
    expected = {
        _normalised(group.slices, f"{prefix}.{index}.")
        for index, layer in enumerate(adapter.layers(model))
        for kind in (
            "kv_groups",
            "neurons",
        )  # MHA: a KV group is one head with its q/k/v rows
        for group in adapter.groups(layer, index, kind)
    }
    assert {_normalised(group.slices) for group in traced.groups} == expected
    assert traced.blocked_channels >= model.config.hidden_size  # the residual stream and the logits stay


def test_traced_cut_equals_masked_model():
    model = build()
    dense = copy.deepcopy(model)
    pruner = HFPruner.from_model(model, example_inputs=IMAGES)
    assert isinstance(pruner, TracedPruner)
    families = {family.name: len(family.groups) for family in pruner.traced.families}
    # the residual stream ties the stem and the outer conv; depthwise conv and GroupNorm follow it
    assert families == {
        "stem.0": 12,
        "inner.0": 16,
        "outer.0, stem.0": 12,
    } or families == {
        "outer.0, stem.0": 12,
        "inner.0": 16,
    }
    report = pruner.prune(PruningConfig(channels=0.3, criterion="magnitude"))
    assert report.parameters_after < report.parameters_before
    assert pruner.model.inner[0].out_channels == 16 - 5 and pruner.model.depthwise[0].groups == 12 - 4
    mask_groups(dense, pruner.removed)
    with torch.no_grad():
        torch.testing.assert_close(pruner.model(IMAGES), dense(IMAGES), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("criterion", ["random", "activation"])
def test_traced_criteria(criterion):
    pruner = HFPruner.from_model(build(), example_inputs=IMAGES)
    report = pruner.prune(channels=2, criterion=criterion, calibration=[IMAGES, IMAGES * 2])
    assert report.criterion == criterion
    assert all(removed == 2 for _, removed in report.families.values())


def test_traced_transformer_heads_and_neurons_cut(one_thread):
    tiny = FAMILIES["llama"]
    model = tiny.build()
    inputs = {**tiny.inputs(1, 5), "use_cache": False}
    pruner = TracedPruner(model, inputs)
    report = pruner.prune(channels=0.3, criterion="magnitude")
    assert report.max_abs_difference < 1e-4
    assert pruner.model.model.layers[0].mlp.down_proj.in_features == 48 - 14


def test_unknown_op_is_reported_not_pruned():
    pruner = HFPruner.from_model(build(SortsChannels), example_inputs=IMAGES)
    reasons = " ".join(blocked.reason for blocked in pruner.traced.blocked)
    assert "sort" in reasons and "does not know this op" in reasons
    assert [family.name for family in pruner.traced.families] == ["inner.0"]
    pruner.prune(channels=0.5, criterion="magnitude")
    assert pruner.model.stem[0].out_channels == 12  # blocked: untouched
    assert "inner.0" in str(pruner.traced) and "sort" in str(pruner.traced)


def test_fixed_channel_slice_is_refused():
    class SlicesChannels(SmallCNN):
        def __init__(self):
            super().__init__()
            self.tail = nn.Linear(8 * 2 * 2, 10)

        def forward(self, x):
            x = self.inner(self.stem(x))[:, :8]  # a fixed count: would not follow a prune of inner.0
            return self.tail(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))

    pruner = HFPruner.from_model(build(SlicesChannels), example_inputs=IMAGES)
    assert not pruner.traced.families or "inner.0" not in [f.name for f in pruner.traced.families]
    assert any("fixed positions" in blocked.reason for blocked in pruner.traced.blocked)


def test_traced_save_and_load_round_trip(tmp_path):
    pruner = HFPruner.from_model(build(), example_inputs=IMAGES)
    pruner.prune(channels=0.3, criterion="magnitude")
    folder = pruner.save_pretrained(tmp_path / "pruned")
    assert sorted(p.name for p in folder.iterdir()) == [
        "model.safetensors",
        "pruned_shapes.json",
    ]
    description = json.loads((folder / "pruned_shapes.json").read_text())
    assert description["shapes"]["inner.0.weight"] == [11, 12 - 4, 3, 3]
    loaded = hf_prune.load_pruned(folder, model=build(seed=1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IMAGES), pruner.model(IMAGES))
    with pytest.raises(OutputExistsError):
        pruner.save_pretrained(folder)


def test_traced_errors_name_the_fix():
    with pytest.raises(InvalidPruningTargetError, match="example_inputs"):
        HFPruner.from_model(build())
    pruner = HFPruner.from_model(build(), example_inputs=IMAGES)
    with pytest.raises(InvalidPruningTargetError, match="channels"):
        pruner.prune(mlp_neurons=0.2)
    with pytest.raises(InvalidPruningTargetError, match="calibration"):
        pruner.prune(channels=0.2, criterion="activation")
    with pytest.raises(InvalidPruningTargetError, match="cannot rank"):
        pruner.prune(channels=0.2, criterion="obs")
    adapter_pruner = HFPruner.from_model(FAMILIES["llama"].build())
    assert isinstance(adapter_pruner, HFPruner)
    with pytest.raises(InvalidPruningTargetError, match="hidden width"):
        adapter_pruner.prune(channels=0.2, criterion="magnitude")
    with pytest.raises(TracingError, match="no prunable"):
        HFPruner.from_model(nn.Linear(4, 2), example_inputs=torch.randn(1, 4)).prune(channels=0.5)


def test_inspect_says_adapter_or_tracing(tmp_path, capsys, one_thread):
    import transformers

    from hf_prune.cli import main

    config = transformers.OPTConfig(
        vocab_size=97,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=48,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    assert main(["inspect", str(tmp_path / "opt")]) == 0
    out = capsys.readouterr().out  # no hand-written adapter: derived, and verified kind by kind
    assert "handled by: an adapter derived from the model and verified" in out
    assert "refused mlp_branches: the MLP projections ['fc1', 'fc2'] have no module of their own" in out
    assert "MLP neurons               96" in out  # 2 layers x ffn_dim 48
    # ALBERT: every layer shares one layer's weights (no block list a config field counts), so nothing is
    # derived: tracing says why.
    albert = transformers.AlbertConfig(
        vocab_size=97,
        embedding_size=16,
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=2,
        intermediate_size=37,
    )
    transformers.AlbertForMaskedLM(albert).save_pretrained(tmp_path / "albert")
    assert main(["inspect", str(tmp_path / "albert")]) == 0
    out = capsys.readouterr().out
    assert "handled by: tracing (no architecture adapter for model_type 'albert')" in out
    assert "why no adapter: model_type 'albert' has no hand-written adapter and none could be derived" in out
    assert "groups  channels" in out
    FAMILIES["llama"].build().save_pretrained(tmp_path / "llama")
    assert main(["inspect", str(tmp_path / "llama")]) == 0
    assert "handled by: the 'llama' architecture adapter" in capsys.readouterr().out


def test_callback_refuses_channels():
    from hf_prune import PruningCallback

    with pytest.raises(InvalidPruningTargetError, match="one-shot"):
        PruningCallback(PruningConfig(channels=0.3))


class Concatenates(nn.Module):
    """Two branches concatenated on the channel axis, one BatchNorm over both, a consumer."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.norm = nn.BatchNorm2d(14)
        self.merge = nn.Conv2d(14, 10, 3, padding=1)
        self.head = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.norm(torch.cat([self.left(x), self.right(x)], dim=1)))
        return self.head(self.merge(x).mean((2, 3)))


def test_concatenated_branches_keep_their_offsets():
    pruner = HFPruner.from_model(build(Concatenates), example_inputs=IMAGES)
    assert [(f.name, len(f.groups)) for f in pruner.traced.families] == [
        ("left", 8),
        ("right", 6),
        ("merge", 10),
    ]
    right = pruner.traced.families[1].groups[0].slices
    assert {(p.parameter, p.start) for p in right if p.parameter.startswith(("norm", "merge"))} == {
        ("norm.weight", 8), ("norm.bias", 8), ("norm.running_mean", 8), ("norm.running_var", 8), ("merge.weight", 8)
    }  # fmt: skip
    report = pruner.prune(channels=0.5, criterion="magnitude")
    assert pruner.model.merge.in_channels == 14 - 4 - 3 and pruner.model.norm.num_features == 7
    assert report.max_abs_difference < 1e-5


def test_export_failure_is_a_tracing_error():
    with pytest.raises(TracingError, match="example_inputs"):
        HFPruner.from_model(build(), example_inputs={"pixels": IMAGES})


def test_settings_tracing_cannot_honour_are_refused():
    pruner = HFPruner.from_model(build(), example_inputs=IMAGES)
    for settings, name in (
        ({"allocation": "global"}, "allocation"),
        ({"round_to": 8}, "round_to"),
        ({"protected_layers": (0,)}, "protected_layers"),
    ):
        with pytest.raises(InvalidPruningTargetError, match=f"{name}: traced models remove the same share"):
            pruner.prune(PruningConfig(channels=0.3, criterion="magnitude", **settings))
