"""Config fields by what they mean: the names config classes give the hidden size, head counts, layer count, MLP
width (issue 15), found through the class's own `attribute_map` and the common aliases in `ALIASES`."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator

from transformers import PretrainedConfig

#: Canonical config field → the names config classes give it (after the class's own `attribute_map`).
ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "n_embed", "dim", "embed_dim", "model_dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_head", "kv_channels", "attention_head_dim", "d_kv", "dim_head"),
    "intermediate_size": (
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "d_ff",
        "dff",
        "ffn_hidden_size",
        "hidden_dim",
        "inner_hidden_size",
        "ffn_size",
        "mlp_dim",
        "dim_ff",
    ),
    "vocab_size": ("vocab_size", "n_vocab"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"),
}


@functools.cache
def default_values(config_class: type[PretrainedConfig]) -> dict:
    """The config class's defaults as `to_dict` writes them (field names as stored)."""
    return config_class().to_dict()


def config_field(config_class: type[PretrainedConfig], canonical: str) -> str | None:
    """The name `config_class` stores `canonical` under: its `attribute_map`, else the first alias it has."""
    mapped = getattr(config_class, "attribute_map", {}).get(canonical)
    if mapped:
        return mapped
    values = default_values(config_class)
    signature = inspect.signature(config_class.__init__).parameters
    return next((alias for alias in ALIASES[canonical] if alias in values or alias in signature), None)


def config_value(config: PretrainedConfig, canonical: str):
    """The value `config` holds for `canonical` (None where its class has no such field)."""
    name = config_field(type(config), canonical)
    return getattr(config, name, None) if name else None


def sub_configs(config: PretrainedConfig, path: str = "") -> Iterator[tuple[str, PretrainedConfig]]:
    """`config` and every config nested in it (`text_config`, `encoder`, ...), each with its dotted path
    ("" for `config` itself)."""
    yield path, config
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            yield from sub_configs(value, f"{path}.{key}" if path else key)


def sub_config(config: PretrainedConfig, path: str) -> PretrainedConfig:
    """The config at dotted `path` under `config` ("" : `config` itself)."""
    return functools.reduce(getattr, path.split("."), config) if path else config


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _tokens(name: str) -> set[str]:
    return set(name.split("_")) - {""}


def entry_field(field: str) -> tuple[str, int | None]:
    """A field's name and list index: `depths[2]` → ("depths", 2), `num_layers` → ("num_layers", None)."""
    name, _, index = field.partition("[")
    return name, int(index.rstrip("]")) if index else None


def field_value(config: PretrainedConfig, field: str):
    """The value of `config`'s field `field`, or of one entry of a list field (`num_heads[2]`)."""
    name, index = entry_field(field)
    value = getattr(config, name)
    return value if index is None else value[index]


def with_entry(config: PretrainedConfig, field: str, value) -> tuple[str, object]:
    """The field to write and the value to write to it so that `field` holds `value`: the field itself, or for
    one entry of a list field (`num_heads[2]`) the whole list with that entry replaced (its type kept)."""
    name, index = entry_field(field)
    if index is None:
        return name, value
    entries = list(getattr(config, name))
    entries[index] = value
    return name, type(getattr(config, name))(entries)


def stage_field(config: PretrainedConfig, canonical: str, layers_field: str | None) -> str | None:
    """`<list>[i]` where the stack is one stage of a hierarchical model, counted by entry `i` of a per-stage list
    (`depths[i]`), and `config` holds `canonical` as a per-stage list as long (Swin's `num_heads = [3, 6, 12, 24]`,
    SegFormer's and PVT's `num_attention_heads`): that stage's entry. None otherwise."""
    counts, index = entry_field((layers_field or "").rpartition(".")[2])
    name = config_field(type(config), canonical)
    if index is None or not name:
        return None
    value, stages = getattr(config, name, None), getattr(config, counts, None)
    if not isinstance(value, (list, tuple)) or not isinstance(stages, (list, tuple)) or len(value) != len(stages):
        return None
    return f"{name}[{index}]" if type(value[index]) is int else None


def role_field(config: PretrainedConfig, canonical: str, layers_field: str | None) -> str | None:
    """The field of `config` sizing `canonical` for the stack `layers_field` counts, where that stack has a role
    the canonical count field does not name (`decoder_layers` → `decoder_attention_heads`, `num_decoder_layers` →
    `num_decoder_attention_heads`): a field holding an int whose name has the role's words and, besides them, the
    words of one alias of `canonical` (a leading `num` / `n` optional). None where the stack has no role or no
    such field."""
    name = (layers_field or "").rpartition(".")[2]
    if not name or name in ALIASES["num_hidden_layers"]:
        return None
    role = _tokens(name) - {"num", "n", "layers", "layer", "hidden"}
    if not role:
        return None
    for key, value in vars(config).items():
        rest = _tokens(key) - role
        if type(value) is not int or not role <= _tokens(key) or not rest:
            continue
        if any(_tokens(alias) - {"num", "n"} <= rest <= _tokens(alias) for alias in ALIASES[canonical]):
            return key
    return None
