"""The loader format, readable with or without hf_prune installed.

A loader-format `config.json` holds the family's own fields, `"model_type": "hf_prune"` and an
`hf_prune` entry with the base `model_type`, every layer's shape and, when a convolutional model's
stage streams were cut (version 2), every stage's stream width (`stream_widths`; the family's
`hidden_sizes` stay dense, since they also derive the inner widths). `HFPruneConfig` reads it;
`load_shaped` builds the family's class, cuts each layer to its saved shape with the same surgery
that pruned it, and lets transformers' `from_pretrained` fill the weights.

`hf_prune.output.remote_code` bundles this module with the adapters, plan and surgery it uses into the
`modeling_hf_prune.py` that loader-format folders carry, so the `HFPrune*` classes below are what
`auto_map` names for `AutoModelFor*.from_pretrained(..., trust_remote_code=True)`. Keep its imports
to torch, transformers and hf_prune modules that import no more (the bundler checks).
"""

from __future__ import annotations

from typing import ClassVar

import transformers
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..errors import PrunedCheckpointError
from ..groups import ArchitectureAdapter, LayerGeometry, get_adapter
from ..plan import LayerPlan, PruningPlan
from ..surgery import apply_plan

LOADER_MODEL_TYPE = "hf_prune"
LOADER_FORMAT_VERSION = 1
#: The version of folders that also record cut stage streams (`stream_widths`).
STREAM_FORMAT_VERSION = 2
#: The version of folders that also record the removed layers (`dense_layers`: original indices and config fields).
LAYERS_FORMAT_VERSION = 3
READABLE_VERSIONS = (LOADER_FORMAT_VERSION, STREAM_FORMAT_VERSION, LAYERS_FORMAT_VERSION)


def layer_geometries(model: nn.Module, adapter: ArchitectureAdapter) -> list[LayerGeometry]:
    return [adapter.geometry(layer) for layer in adapter.layers(model)]


def stream_widths(model: nn.Module, adapter: ArchitectureAdapter) -> list[int] | None:
    """Every stage's stream width when some differ from the config's `hidden_sizes`, else `None`."""
    widths = adapter.stream_config_fields(model).get("hidden_sizes")
    return widths if widths is not None and widths != list(model.config.hidden_sizes) else None


class HFPruneConfig(PretrainedConfig):
    """A loader-format config: the base family's fields plus the per-layer shapes."""

    model_type = LOADER_MODEL_TYPE

    def _metadata(self) -> dict:
        metadata = getattr(self, "hf_prune", None)
        if not isinstance(metadata, dict):
            raise PrunedCheckpointError("config.json has model_type 'hf_prune' but no 'hf_prune' entry.")
        if metadata.get("format_version") not in READABLE_VERSIONS:
            raise PrunedCheckpointError(
                f"config.json uses loader format version {metadata.get('format_version')}; this code reads "
                f"versions {READABLE_VERSIONS}. Upgrade hf_prune (or re-save the folder with it)."
            )
        return metadata

    def base_config(self) -> PretrainedConfig:
        """The family's own config class, with the fields saved beside the loader entry."""
        fields = self.to_dict()
        for key in ("hf_prune", "model_type", "auto_map", "transformers_version"):
            fields.pop(key, None)
        fields |= self.dense_layers().get("fields", {})  # the dense stack: the removed layers are dropped again
        return AutoConfig.for_model(self._metadata()["base_model_type"], **fields)

    def dense_layers(self) -> dict:
        """`{"kept": original indices of the saved layers, "fields": the config fields before the removal}`
        (version 3; empty where the folder was built from its config alone)."""
        return dict(self._metadata().get("dense_layers") or {})

    def layer_shapes(self) -> list[LayerGeometry]:
        return [LayerGeometry.from_dict(entry) for entry in self._metadata()["layers"]]

    def stream_widths(self) -> list[int]:
        """Every stage's cut stream width (empty: the streams have the config's widths)."""
        return list(self._metadata().get("stream_widths", []))


def shaped_class(
    model_class: type[PreTrainedModel],
    adapter: ArchitectureAdapter,
    targets: list[LayerGeometry],
    widths: list[int] = (),
    kept: list[int] | None = None,
):
    """A subclass of `model_class` that takes the saved per-layer shapes as soon as it is built,
    so transformers' own `from_pretrained` (key renames, dtype, device_map, ...) fills it; with `kept`, the
    config builds the dense stack and only those layers (original indices) stay."""

    class Shaped(model_class):
        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            dense = layer_geometries(self, adapter)
            indices = list(range(len(dense))) if kept is None else list(kept)
            if len(indices) != len(targets) or not set(indices) <= set(range(len(dense))):
                raise PrunedCheckpointError(f"{len(targets)} saved layer shapes for {len(dense)} layers ({kept=})")
            shapes = dict(zip(indices, targets))
            plans = [
                LayerPlan.first(i, d, shapes[i]) if i in shapes else LayerPlan(i, d, keep_layer=False)
                for i, d in enumerate(dense)
            ]
            streams = {stage: tuple(range(width)) for stage, width in enumerate(widths)}
            apply_plan(self, adapter, PruningPlan(plans, streams))

    # Present as the family's own class: transformers applies its checkpoint key renames
    # (e.g. GPT-NeoX `embed_out` → `lm_head`) only to classes defined inside transformers.
    Shaped.__name__ = Shaped.__qualname__ = model_class.__name__
    Shaped.__module__ = model_class.__module__
    return Shaped


def load_shaped(
    model_class: type[PreTrainedModel], name_or_path, config: HFPruneConfig, *args, **from_pretrained_kwargs
) -> PreTrainedModel:
    """`model_class` (a family class such as `LlamaForCausalLM`) cut to the saved shapes, weights loaded."""
    base = config.base_config()
    kept = config.dense_layers().get("kept")
    shaped = shaped_class(model_class, get_adapter(base), config.layer_shapes(), config.stream_widths(), kept)
    return shaped.from_pretrained(name_or_path, *args, config=base, **from_pretrained_kwargs)


class HFPruneModel(PreTrainedModel):
    """What `auto_map` names: `from_pretrained` returns the family's model of the same auto class
    (`AutoModelForCausalLM` → e.g. `LlamaForCausalLM`), cut to the saved shapes."""

    config_class = HFPruneConfig
    auto_class_name: ClassVar[str] = "AutoModel"

    @classmethod
    def from_pretrained(cls, name_or_path, *args, config: HFPruneConfig | None = None, **kwargs) -> PreTrainedModel:
        if not isinstance(config, HFPruneConfig):
            config = HFPruneConfig.from_pretrained(name_or_path)
        auto_class = getattr(transformers, cls.auto_class_name)
        model_class = auto_class._model_mapping[type(config.base_config())]
        if isinstance(model_class, tuple):  # several classes per config (DeiT): the saved one
            model_class = next((c for c in model_class if c.__name__ in (config.architectures or [])), model_class[0])
        return load_shaped(model_class, name_or_path, config, *args, **kwargs)


class HFPruneForCausalLM(HFPruneModel):
    auto_class_name = "AutoModelForCausalLM"


class HFPruneForMaskedLM(HFPruneModel):
    auto_class_name = "AutoModelForMaskedLM"


class HFPruneForSequenceClassification(HFPruneModel):
    auto_class_name = "AutoModelForSequenceClassification"


class HFPruneForTokenClassification(HFPruneModel):
    auto_class_name = "AutoModelForTokenClassification"


class HFPruneForQuestionAnswering(HFPruneModel):
    auto_class_name = "AutoModelForQuestionAnswering"


class HFPruneForImageClassification(HFPruneModel):
    auto_class_name = "AutoModelForImageClassification"


AUTO_CLASSES: dict[str, type[HFPruneModel]] = {
    cls.auto_class_name: cls
    for cls in (
        HFPruneModel,
        HFPruneForCausalLM,
        HFPruneForMaskedLM,
        HFPruneForSequenceClassification,
        HFPruneForTokenClassification,
        HFPruneForQuestionAnswering,
        HFPruneForImageClassification,
    )
}
