"""Pruned checkpoints on disk: the vanilla format when a standard config can express the shapes,
the loader format otherwise; written atomically, safetensors only.

*Vanilla*: `config.json` carries the family's standard fields (`num_attention_heads`,
`num_key_value_heads`, `head_dim`, `intermediate_size`, `num_hidden_layers`, `layer_types`, ...)
and the folder loads with `AutoModelFor*.from_pretrained` in a process that never imports hf_prune.

*Loader*: the shapes differ per layer, or the family's config derives a shape the pruned model
no longer has. `config.json` then gets `model_type: "hf_prune"` and an `hf_prune` entry with the
base `model_type` and every layer's shape (see `loader_format.py`); `load_pruned` rebuilds the
skeleton and loads the weights. The folder also carries `modeling_hf_prune.py`, named in
`auto_map`, so `AutoModelFor*.from_pretrained(folder, trust_remote_code=True)` works without
hf_prune; without `trust_remote_code` transformers refuses the custom code, never with a size mismatch.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..errors import PrunedCheckpointError
from ..groups import ArchitectureAdapter
from ..groups.base import set_config_field
from ..surgery import DENSE_LAYERS, drop_layers
from ..tracing.checkpoint import load_traced
from .loader_format import (
    LAYERS_FORMAT_VERSION,
    LOADER_FORMAT_VERSION,
    LOADER_MODEL_TYPE,
    STREAM_FORMAT_VERSION,
    HFPruneConfig,
    layer_geometries,
    load_shaped,
    stream_widths,
)
from .remote_code import write_remote_code


@dataclass(frozen=True)
class FormatDecision:
    """Which format a pruned model is written in, why, and (vanilla) the config fields to write."""

    vanilla: bool
    reason: str
    config_fields: dict

    @property
    def name(self) -> str:
        return "vanilla" if self.vanilla else "loader"


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose tensors live on the meta device: shapes without memory, for dry runs."""
    memo = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def decide_format(model: PreTrainedModel, adapter: ArchitectureAdapter) -> FormatDecision:
    """Vanilla if every layer has the same shape and the family's config class, given the
    standard fields for that shape, builds a model with exactly the pruned model's tensor shapes."""
    geometries = layer_geometries(model, adapter)
    has_attention = "heads" in adapter.kinds
    if any((has_attention and g.attention is None) or g.intermediate_size is None for g in geometries):
        return FormatDecision(
            False, "some attention or MLP branches were removed: no standard config field says so", {}
        )
    if not adapter.shapes_per_stage and any(g != geometries[0] for g in geometries):
        return FormatDecision(False, "layers have different head or neuron counts: standard configs hold one size", {})
    fields = adapter.config_fields(model.config, geometries[0]) | adapter.stream_config_fields(model)
    candidate = copy.deepcopy(model.config)
    for key, value in fields.items():
        set_config_field(candidate, key, value)
    try:
        candidate = type(candidate).from_dict(candidate.to_dict())
        with torch.device("meta"):
            expected = type(model)(candidate).state_dict()
    except Exception as error:  # the config class's own validation says why
        reason = str(error).strip().splitlines()[-1]
        return FormatDecision(False, f"{type(model.config).__name__} rejects the pruned shapes ({reason})", {})
    dependence = layer_dependence(model, adapter)
    if dependence:
        return FormatDecision(False, dependence, {})
    actual = model.state_dict()
    mismatched = [
        name
        for name in sorted(set(expected) | set(actual))
        if name not in expected or name not in actual or expected[name].shape != actual[name].shape
    ]
    if mismatched:
        name = mismatched[0]
        detail = (
            f"{name}: config gives {tuple(expected[name].shape)}, pruned model has {tuple(actual[name].shape)}"
            if name in expected and name in actual
            else f"{name} exists in only one of them"
        )
        return FormatDecision(
            False, f"{type(model.config).__name__} derives a different shape from its fields ({detail})", {}
        )
    return FormatDecision(True, "every layer has the same shape and the standard config fields express it", fields)


#: Plain attributes a block sets from its index or from the layer count (`lambda_init`, `residual_scale`, ...).
_SCALARS = (bool, int, float, str)
#: Attributes and modules that do nothing in eval mode (the training flag, dropout and stochastic-depth rates and
#: modules, which BEiT and Swin schedule by the block's index): never a reason to leave the vanilla format.
_TRAINING_ONLY = r"^training$|drop|^p$"


def layer_dependence(model: PreTrainedModel, adapter: ArchitectureAdapter) -> str | None:
    """Why a model whose layers were removed (`surgery.DENSE_LAYERS`) cannot be rebuilt from its config alone:
    the first plain attribute (or module) of a kept block that differs between a model built from the pruned
    config and the dense one with the same layers dropped (blocks built from their index: DiffLlama's
    `lambda_init(layer_idx)`, Swin's shifted windows; or from the layer count: MiniCPM's residual scale), or
    the first weight sized by the layer count (ESM's contact head); None where they agree. Both are built on
    the meta device with their dense widths."""
    record = getattr(model, DENSE_LAYERS, None)
    if not record:
        return None
    config = model.config
    dense_config = type(config).from_dict(config.to_dict() | record["fields"])
    try:
        with torch.device("meta"):
            fresh = type(model)(type(config).from_dict(config.to_dict()))
            dense = type(model)(dense_config)
        drop_layers(dense, adapter, record["kept"])
    except Exception as error:  # the class refuses one of the configs: no vanilla claim
        return f"the layer removal cannot be checked against a fresh model ({type(error).__name__}: {error})"
    built_shapes, kept_shapes = fresh.state_dict(), dense.state_dict()
    for name, tensor in kept_shapes.items():  # a weight sized by the layer count (ESM's contact head)
        if name not in built_shapes or built_shapes[name].shape != tensor.shape:
            shape = tuple(built_shapes[name].shape) if name in built_shapes else "absent"
            return f"{name} is {tuple(tensor.shape)} in the kept model, {shape} in one built from the pruned config"
    for index, (built, kept) in enumerate(zip(adapter.layers(fresh), adapter.layers(dense))):
        kept_modules = dict(kept.named_modules())
        for name, module in built.named_modules():
            other = kept_modules.get(name)
            where = f"layer {index}{'.' + name if name else ''}"
            if type(other) is not type(module) and not re.search(_TRAINING_ONLY, name.rpartition(".")[2]):
                return f"{where} is built unlike the kept layer: {type(model).__name__} builds blocks by their index"
            if type(other) is not type(module):  # BEiT's `drop_path`: an identity at rate 0, in eval at any
                continue
            for key, value in vars(module).items():
                if not isinstance(value, _SCALARS) or re.search(_TRAINING_ONLY, key):
                    continue
                kept_value = vars(other).get(key)
                if not isinstance(kept_value, _SCALARS) or kept_value != value:
                    return (
                        f"{where}.{key} is {kept_value!r} in the kept layer, {value!r} in a model built "
                        f"from the pruned config: {type(model).__name__} builds blocks from their index or the layer "
                        "count"
                    )
    return None


# --------------------------------------------------------------------------- saving
def write_loader_config(folder: Path, model: PreTrainedModel, adapter: ArchitectureAdapter) -> None:
    """Rewrite `config.json` into the loader format and add the remote code (see the module docstring)."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["hf_prune"] = {
        "format_version": LOADER_FORMAT_VERSION,
        "base_model_type": config["model_type"],
        "layers": [geometry.to_dict() for geometry in layer_geometries(model, adapter)],
    }
    record = getattr(model, DENSE_LAYERS, None)
    if record and layer_dependence(model, adapter):  # the loader builds the dense stack and drops these layers
        config["hf_prune"] |= {"format_version": LAYERS_FORMAT_VERSION, "dense_layers": record}
    widths = stream_widths(model, adapter)
    if widths is not None:  # the config keeps the dense `hidden_sizes`; the loader cuts the streams to these
        config["hf_prune"] |= {"stream_widths": widths}
        config["hf_prune"]["format_version"] = max(config["hf_prune"]["format_version"], STREAM_FORMAT_VERSION)
    config["model_type"] = LOADER_MODEL_TYPE
    config["auto_map"] = write_remote_code(folder, type(model.config), config["architectures"][0])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- loading
def load_pruned(
    name_or_path: str | os.PathLike, model: nn.Module | None = None, **from_pretrained_kwargs
) -> PreTrainedModel:
    """Load a folder (or Hub repo) hf_prune wrote, in either format, without `trust_remote_code`.

    A traced prune (`HFPruner.from_model`) is loaded into `model`, a freshly built unpruned instance
    of the same architecture: it is cut as the saved description says, then filled.

    Vanilla checkpoints go straight to `from_pretrained`. For loader-format ones the family's
    model class (from `config.architectures`) is shaped layer by layer as the saved metadata
    says, then filled by `from_pretrained`; every `from_pretrained` keyword works.
    """
    if model is not None:
        return load_traced(name_or_path, model)
    try:
        raw, _ = PretrainedConfig.get_config_dict(name_or_path, **dict(from_pretrained_kwargs))
    except OSError as error:
        raise PrunedCheckpointError(
            f"{name_or_path} has no readable config.json ({error}); pass the folder that save_pretrained wrote "
            "or the Hub repo it was pushed to."
        ) from error
    architectures = raw.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    if model_class is None:
        raise PrunedCheckpointError(
            f"config.json of {name_or_path} names no known model class in 'architectures' ({architectures})."
        )
    if raw.get("model_type") != LOADER_MODEL_TYPE:
        return model_class.from_pretrained(name_or_path, **from_pretrained_kwargs)
    return load_shaped(model_class, name_or_path, HFPruneConfig.from_dict(raw), **from_pretrained_kwargs)
