"""Adapters derived from the model itself, for model types without a hand-written one (issue 15).

How: build a tiny random instance of the *same* config class (its defaults, shrunk by one generic
rule: `TINY`), then read the adapter's names from that model rather than from a per-family file:

* the layer stack: the one `ModuleList` whose length is the config's layer-count field;
* in its first block, every `nn.Linear` / GPT-2 `Conv1D` with its input and output widths. With
  `H` the hidden size, `n`, `m` the query and KV head counts and `d` the head size (config fields
  found through the config class's `attribute_map` and the common aliases in `ALIASES`):
  query = `H → n·d`, key and value = `H → m·d`, output = `n·d → H`; MLP producers `H → I`
  (one: plain, two: gated), down projection `I → H`, with `I` the intermediate-size field;
* dataflow, confirmed by one forward per probe (`reach`): a unit added to output channel `c` of a
  producer must reach exactly the consumer's input columns the layout says (a value channel only
  its own column in every query head that reads it, a query or key channel only the columns of its
  heads, an MLP producer's neuron only its own down-projection column). Names are hints for the
  order only (q before k, gate before up), never the evidence.

Nothing derived here is used before `verify.verify` has cut the tiny model with a random
plan of every kind and compared it with the masked reference; kinds that fail are refused with a
`DerivedAdapterError` naming what could not be resolved.

A fused q/k/v projection (`H → (n + 2m)·d`, `m` the KV heads or one for multi-query) is read chunk by chunk
(`_fused_layout`): its layout must be one of `FUSED_LAYOUTS`. Left for later (refused with the typed error
saying what was found): fused gate/up projections, several layer stacks (encoder-decoder), mixture-of-experts
and state-space mixers.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto
from transformers.pytorch_utils import Conv1D

from ..errors import DerivedAdapterError
from ..groups.base import (
    ArchitectureAdapter,
    AttentionGeometry,
    LayerGeometry,
    TensorSlice,
    in_features,
    input_slices,
    out_features,
    output_slices,
)
from ..groups.experts import ExpertLayout
from ..kinds import ATTENTION_KINDS, EXPERT_KINDS, TRANSFORMER_KINDS, GroupKind
from .experts import derive_experts, moe_output

#: Canonical config field → the names config classes give it (after the class's own `attribute_map`).
ALIASES: dict[str, tuple[str, ...]] = {
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "n_embed", "dim", "embed_dim", "model_dim"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_head_kv", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_head", "kv_channels", "attention_head_dim"),
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
    ),
    "vocab_size": ("vocab_size", "n_vocab"),
    "max_position_embeddings": ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"),
}
#: The generic shrink rule: these canonical fields take these values in the tiny instance. The widths
#: are pairwise distinct (q 96, kv 48, hidden 64, MLP 40) so that shapes alone tell projections apart
#: when the config has its own `head_dim`; otherwise `d = H / n` = 16 and q = o = 64, kv = 32.
TINY = {
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 24,
    "intermediate_size": 40,
    "vocab_size": 128,
    "max_position_embeddings": 128,
}
#: The head sizes a tiny instance is tried with: `TINY`'s own, then hidden / heads (for classes that derive it).
HEAD_DIMS = (TINY["head_dim"], TINY["hidden_size"] // TINY["num_attention_heads"])
#: A tiny instance larger than this means the shrink missed a field: refused rather than built.
MAX_TINY_PARAMETERS = 2_000_000
#: Name hints, only to order projections whose shapes and dataflow are alike (never as evidence).
_HINTS = {
    "q": {"q", "query", "wq", "queries"},
    "k": {"k", "key", "wk", "keys"},
    "v": {"v", "value", "wv", "values"},
    "gate": {"gate", "w1", "wi_0"},
}
#: Task heads tried, in order, for the tiny instance (the layers live in the base model either way).
_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING",
    "MODEL_FOR_MASKED_LM_MAPPING",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
    "MODEL_MAPPING",
)


# --------------------------------------------------------------------------- config fields
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


#: The generic shrink rule for every other integer field, by what its name says it sizes (first match wins;
#: a field is only ever made smaller). Applied to the config and, recursively, to every nested config.
#: `None`: left as it is (ids, indices, windows, ...); an int: the cap; "layers" follows `TINY`'s layer count.
LAYER_COUNT = r"(?:num_|n_)?(?:[a-z]+_)?layers?"
SIZE_FIELDS: tuple[tuple[str, int | str | None], ...] = (
    (r"token|_id$|_ids$|index|seed|divisible|offset|window|chunk|bucket|distance|sampl|length|scal|stride", None),
    (LAYER_COUNT, "layers"),  # full match: num_hidden_layers, encoder_layers, n_layer
    (r"size|dim|rank|d_model|n_embd|n_embed|d_ff|dff|n_inner|d_kv|kv_channels|d_state", "width"),
    (r"per_tok|topk|top_k|(?:^|_)k$", 2),
    (r"group", 1),  # expert groups (n_group, topk_group): one group of all experts
    (r"shared_experts$|shared_expert_num", 1),
    (r"expert", 4),  # num_experts, n_routed_experts, num_local_experts
    (r"key_value_heads|kv_heads|head_kv|query_groups", TINY["num_key_value_heads"]),
    (r"heads?$", TINY["num_attention_heads"]),
)
#: The cap of a field no name pattern covers but whose value a parameter shape of the tiny model shows.
SHAPE_CAP = 32
#: Widths by their name, for fields `SIZE_FIELDS` calls "width" (first match wins).
WIDTHS: tuple[tuple[str, int], ...] = (
    (r"vocab", TINY["vocab_size"]),
    (r"max_position|_positions$|n_ctx|max_seq_len|context", TINY["max_position_embeddings"]),
    (r"head_dim|head_size|d_head|dim_head|d_kv|kv_channels|rotary_dim", TINY["head_dim"]),
    (r"(?:intermediate|ffn|d_ff|dff|inner|mlp|feed_forward).*(?:moe|expert)|(?:moe|expert).*(?:intermediate|ffn)", 36),
    (r"intermediate|ffn|d_ff|dff|inner|mlp|feed_forward", TINY["intermediate_size"]),
    (r"rank", 20),
    (r"state", 16),
    (r"", TINY["hidden_size"]),
)


def _role(name: str, head_dim: int) -> int | None:
    """The cap `SIZE_FIELDS` / `WIDTHS` give an integer field called `name`, or None (left as it is)."""
    for pattern, role in SIZE_FIELDS:
        hit = re.fullmatch(pattern, name) if role == "layers" else re.search(pattern, name)
        if hit and role == "width":
            cap = next(cap for width, cap in WIDTHS if re.search(width, name))
            return head_dim if cap == TINY["head_dim"] else cap
        if hit:
            return TINY["num_hidden_layers"] if role == "layers" else role
    return None


#: The widest entry of a per-stage width list (`hidden_sizes`, `embed_dims`, `in_channels`, ...) after shrinking.
LIST_WIDTH = 128
#: Per-stage list fields left as they are (kernels, patches, strides, ratios, ...), then those holding depths.
LIST_KEPT = SIZE_FIELDS[0][0] + r"|kernel|patch|padding|pad|image|ratio|shape|train_size|level|scales|rates"
LIST_DEPTHS = r"depth|repeat|blocks|layers"


#: Float fields that scale every width or depth of a convolutional family (`depth_multiplier`, `width_coefficient`).
SCALED = r"multiplier|coefficient"
#: Backbone fields naming stages by index (`out_indices`, `out_features`): dropped, the class's defaults follow.
BACKBONE_OUTPUTS = ("out_features", "out_indices", "stage_names")


def _int_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(type(v) is int and v > 0 for v in value)


def _width_list(key: str, value) -> bool:
    return (
        _int_list(value)
        and not re.search(LIST_KEPT, key)
        and not re.search(LIST_DEPTHS, key)
        and not re.search(r"heads?$", key)
        and bool(re.search(r"size|dim|channels|width", key))
    )


def _shrink_list(key: str, value: list[int], factor: int) -> list[int]:
    """The generic shrink rule for per-stage integer lists (convolutional and hierarchical vision configs):
    widths divided by `factor` (one power of two for every width list of the config, so the widest entry is
    at most `LIST_WIDTH` and every ratio and equality between lists holds, as `in_channels[i + 1] ==
    out_channels[i]`), depths capped at 2, head counts rounded down to a power of two at most `TINY`'s;
    every other list (kernels, strides, ratios, ...) is left as it is."""
    if _width_list(key, value):
        return [max(1, v // factor) for v in value]
    if re.search(LIST_KEPT, key):
        return value
    if re.search(LIST_DEPTHS, key):
        return [min(v, 2) for v in value]
    if re.search(r"heads?$", key):
        return [1 << (min(v, TINY["num_attention_heads"]).bit_length() - 1) for v in value]
    return value


def _shrink(config_class, values: dict, head_dim: int, changed: dict, path: str, shape_dims: frozenset = frozenset()):
    """Shrink one (possibly nested) config dict in place: the fields `ALIASES` names to `TINY`, every other
    integer size field to at most its `SIZE_FIELDS` cap, per-layer lists and `{layer: ...}` dicts to the new
    layer count, token ids into the small vocabulary; nested configs (dicts of the class's `sub_configs`, or
    holding a `model_type`) the same way."""
    old, canonical_names = dict(values), set()
    if config_class is not None:  # the canonical fields take `TINY`'s values exactly (set even where None)
        for canonical, value in TINY.items():
            name = config_field(config_class, canonical)
            if name is not None and not _int_list(values.get(name)):  # per-stage lists: `_shrink_list`
                values[name] = head_dim if canonical == "head_dim" else value
                canonical_names.add(name)
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    widest = max((max(v) for k, v in values.items() if _width_list(k, v)), default=0)
    factor = 1
    while widest // factor > LIST_WIDTH:
        factor *= 2
    for key, value in list(values.items()):
        if isinstance(value, dict) and (key in sub_configs or "model_type" in value):
            sub_class = sub_configs.get(key)
            sub_class = sub_class if isinstance(sub_class, type) and issubclass(sub_class, PretrainedConfig) else None
            _shrink(sub_class, value, head_dim, changed, f"{path}{key}.", shape_dims)
        elif key not in canonical_names and isinstance(value, int) and not isinstance(value, bool):
            cap = _role(key, head_dim)
            if cap is None and value in shape_dims and not any(re.search(p, key) for p, _ in SIZE_FIELDS[:1]):
                cap = SHAPE_CAP  # no name says what it sizes, but a parameter shape shows it does
            if isinstance(cap, int) and value > cap:
                values[key] = cap
        elif key not in canonical_names and _int_list(value):
            values[key] = _shrink_list(key, value, factor)
        elif isinstance(value, float) and re.search(SCALED, key):
            values[key] = min(value, 0.25)
    for key in BACKBONE_OUTPUTS:  # they name stages by index: the class's defaults follow the new stage count
        values.pop(key, None)
    layer_fields = [key for key in values if re.fullmatch(LAYER_COUNT, key)]
    layer_fields += [config_field(config_class, "num_hidden_layers")] if config_class is not None else []
    counts = {(old[k], values[k]) for k in layer_fields if isinstance(old.get(k), int) and old[k] != values[k]}
    vocab = TINY["vocab_size"]
    for key, value in values.items():
        if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
            values[key] = vocab - 1
        elif key.endswith("token_id") and isinstance(value, list):
            values[key] = [v if v < vocab else vocab - 1 for v in value]
        for before, after in counts:  # per-layer lists and {layer index: ...} dicts follow the layer count
            if isinstance(value, list) and len(value) == before:
                values[key] = value[:after]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                values[key] = {k: v for k, v in value.items() if int(k) < after}
    for key, value in values.items():
        if isinstance(old.get(key), int) and isinstance(value, int) and old[key] != value and not key.endswith("_id"):
            changed[path + key] = (old[key], value)


def tiny_config(config_class: type[PretrainedConfig], head_dim: int = TINY["head_dim"]) -> PretrainedConfig:
    """The class's defaults shrunk by one generic rule: `TINY` for the fields `ALIASES` names, `SIZE_FIELDS`
    for every other integer field that sizes a weight (nested configs too); per-layer lists keep their
    first entries. `changed_fields` says which fields it changed."""
    config, _ = _tiny_config(config_class, head_dim)
    return config


def _tiny_config(config_class, head_dim: int, shape_dims: frozenset = frozenset()) -> tuple[PretrainedConfig, dict]:
    """`tiny_config` and the changed fields; with `shape_dims` (the dimensions of the parameter shapes of a
    first tiny model too large), also every integer field no name pattern covers whose value is one of them."""
    values = copy.deepcopy(default_values(config_class))
    changed: dict[str, tuple[int, int]] = {}
    _shrink(config_class, values, head_dim, changed, "", shape_dims)
    values.pop("transformers_version", None)
    return config_class.from_dict(values), changed


def changed_fields(config_class: type[PretrainedConfig]) -> dict[str, tuple[int, int]]:
    """Dotted field name → (default, tiny) for every integer field the shrink rule changed."""
    return _tiny_config(config_class, TINY["head_dim"])[1]


def tiny_model_class(config_class: type[PretrainedConfig]) -> type[nn.Module]:
    """The first of causal LM, masked LM, sequence classification, image classification, base model."""
    for name in _MAPPINGS:
        mapping = getattr(modeling_auto, name)
        if config_class in mapping:
            found = mapping[config_class]
            return found[0] if isinstance(found, tuple) else found
    raise DerivedAdapterError(f"{config_class.__name__} has no model class in transformers' auto mappings.")


def tiny_inputs(model: nn.Module, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        vision = getattr(config, "vision_config", None) or config  # CLIP-like: the vision tower's own size
        size, channels = getattr(vision, "image_size", 32), getattr(vision, "num_channels", 3)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}
    return {"input_ids": torch.randint(3, TINY["vocab_size"], (2, 7), generator=generator)}


def build_tiny(config_class: type[PretrainedConfig], seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny random instance (eval mode; norms and biases perturbed so masking bugs show) and its inputs.

    The config is `tiny_config`'s; where the class refuses a head size of its own (`d_head` must be
    `d_model / n_head`), or the model's forward does (a rotary width that must equal the head size), it is
    retried with `head_dim` = `hidden_size / num_attention_heads`. The model is built on the meta device
    first to count its parameters without allocating them (`tiny_size`)."""
    first = None
    for head_dims in (HEAD_DIMS, HEAD_DIMS[1:]):
        try:
            model_class = tiny_model_class(config_class)
            config, shape_fields = tiny_size(config_class, model_class, head_dims)
            if shape_fields:
                warnings.warn(f"{config_class.__name__}: shrunk by parameter shape only: {shape_fields}", stacklevel=2)
            torch.manual_seed(seed)
            model = model_class(config).eval()
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "norm" in name.lower() or name.endswith("bias"):
                        parameter.add_(0.1 * torch.randn_like(parameter))
            inputs = tiny_inputs(model, config)
            if head_dims == HEAD_DIMS and config_field(config_class, "head_dim") is None:
                model_output(model, inputs)  # a head size the forward refuses: retried with H / n
            return model, inputs
        except DerivedAdapterError as error:
            first = first or error
        except Exception as error:  # the config class or model refuses the generic shrink
            first = first or DerivedAdapterError(
                f"{config_class.__name__}: could not build a tiny instance from its defaults "
                f"({type(error).__name__}: {first_line(error)})."
            )
            first.__cause__ = error
    raise first


def meta_size(model_class: type[nn.Module], config: PretrainedConfig) -> tuple[int, set[int]]:
    """Parameter count and every dimension of every parameter shape of `model_class(config)`, built on the
    meta device (shapes only, nothing allocated)."""
    with torch.device("meta"):
        model = model_class(config)
    shapes = [p.shape for p in model.parameters()]
    return sum(shape.numel() for shape in shapes), {d for shape in shapes for d in shape}


def tiny_size(config_class, model_class, head_dims: tuple[int, ...] = HEAD_DIMS) -> tuple[PretrainedConfig, dict]:
    """The tiny config whose meta-built model is under `MAX_TINY_PARAMETERS`, and the fields only the
    parameter shapes named (see `tiny_config`'s `shape_dims`); a typed refusal when none is."""
    error = None
    for head_dim in head_dims:
        try:
            config, changed = _tiny_config(config_class, head_dim)
            size, dims = meta_size(model_class, config)
        except Exception as caught:  # a divisibility or consistency check of the class: try the next head size
            error = error or caught
            continue
        if size <= MAX_TINY_PARAMETERS:
            return config, {}
        before = changed
        config, changed = _tiny_config(config_class, head_dim, frozenset(dims))
        size, _ = meta_size(model_class, config)
        if size <= MAX_TINY_PARAMETERS:
            return config, {key: value for key, value in changed.items() if key not in before}
        raise DerivedAdapterError(
            f"{config_class.__name__}: the generic shrink leaves {size:,} parameters (> {MAX_TINY_PARAMETERS:,}): "
            "some width or count field of this config is not one `SIZE_FIELDS` knows, nor a parameter shape shows."
        )
    raise error


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def model_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The tensor compared across cut, masked and reloaded models: logits, else the last hidden state."""
    with torch.no_grad():
        output = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    return output[0]


# --------------------------------------------------------------------------- dataflow probes
def _projections(block: nn.Module) -> dict[str, tuple[int, int]]:
    """Every `Linear` / `Conv1D` of a block: name → (input width, output width)."""
    return {
        name: (in_features(module), out_features(module))
        for name, module in block.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
    }


@torch.no_grad()
def reach(model: nn.Module, inputs: dict, block: nn.Module, producer: str, channel: int, consumer: str) -> set[int]:
    """The input columns of `consumer` that change when output channel `channel` of `producer` changes.

    One forward with a forward hook adding seeded noise to that channel (noise, not a constant: a
    constant added to a key channel shifts every score of a row alike, which softmax ignores), against
    one without: the columns whose input moved (relative tolerance 1e-6) are the ones the channel reaches."""
    seen: list[torch.Tensor] = []

    def record(module, args):
        seen.append(args[0].detach().clone())

    def bump(module, args, output):
        output = output.clone()
        generator = torch.Generator().manual_seed(channel)
        noise = torch.randn(output[..., channel].shape, generator=generator, dtype=output.dtype)
        output[..., channel] += noise.to(output.device)
        return output

    handles = [block.get_submodule(consumer).register_forward_pre_hook(record)]
    model_output(model, inputs)
    handles.append(block.get_submodule(producer).register_forward_hook(bump))
    model_output(model, inputs)
    for handle in handles:
        handle.remove()
    if len(seen) < 2:  # the consumer never runs on these inputs (cross-attention without an encoder): unreached
        return set()
    base, moved = seen[0], seen[1]
    scale = base.abs().max().clamp(min=1e-3)
    changed = ((moved - base).abs() > 1e-6 * scale).reshape(-1, base.shape[-1]).any(0)
    return set(torch.nonzero(changed).flatten().tolist())


# --------------------------------------------------------------------------- derivation
@dataclass
class Derivation:
    """What derivation found on the tiny instance; `refused` holds each kind it could not resolve and why."""

    config_class: type[PretrainedConfig]
    layers_path: str = ""
    attention_module: str | None = None
    mlp_module: str | None = None
    q_proj: str | None = None
    #: a fused q/k/v projection and its `FUSED_LAYOUTS` layout (instead of q_proj, k_proj, v_proj)
    qkv_proj: str | None = None
    qkv_layout: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    gate_proj: str | None = None
    up_proj: str | None = None
    down_proj: str | None = None
    heads_module: str | None = None
    head_dim_attribute: str = "head_dim"
    removed_attention_output: str = "zeros_and_none"
    removed_mlp_output: str = "zeros"
    #: whether the MLP's down-projection output is added to the residual stream unchanged (`_adds_to_stream`)
    mlp_adds_to_stream: bool = False
    #: the routed experts' layout (mixture-of-experts MLPs, `experts.py`)
    experts: ExpertLayout | None = None
    refused: dict[str, str] = field(default_factory=dict)
    #: kind → how the verification's vanilla save went ("vanilla", or "loader: <reason>")
    formats: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def kinds(self) -> frozenset[GroupKind]:
        claimed = TRANSFORMER_KINDS | (EXPERT_KINDS if self.experts else frozenset())
        return frozenset(kind for kind in claimed if kind not in self.refused)

    def refuse(self, kinds, reason: str) -> None:
        for kind in kinds:
            self.refused.setdefault(kind, reason)


def _tokens(name: str) -> set[str]:
    last = name.rpartition(".")[2]
    return {last, *re.split(r"[_\d]+", last)} - {""}


def _hinted(names: list[str], hint: str) -> list[str]:
    """`names` with those the hint names first (stable otherwise: registration order)."""
    return sorted(names, key=lambda name: 0 if _tokens(name) & _HINTS[hint] else 1)


def _parent(names: list[str]) -> str:
    """The longest common dotted prefix of `names` (their closest common module)."""
    parts = [name.split(".")[:-1] for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common)


def find_layers(model: nn.Module, count: int) -> str:
    """Qualified name of the one `ModuleList` of `count` alike blocks that hold projections."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and len({type(block) for block in module}) == 1
        and len(_projections(module[0])) >= 2
    ]
    if len(found) != 1:
        raise DerivedAdapterError(
            f"{type(model).__name__}: expected one list of {count} blocks (the config's layer count), found "
            f"{found or 'none'}; several stacks (encoder-decoder) are not derived yet."
        )
    return found[0]


def relative_layers_path(model: nn.Module, name: str) -> str:
    """The layer list's name below the base model (`model.layers` → `layers`), so task heads match too."""
    prefix = getattr(model, "base_model_prefix", "")
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def derive(config_class: type[PretrainedConfig]) -> tuple[Derivation, nn.Module, dict]:
    """Read the adapter's names from a tiny instance of `config_class` (not yet verified)."""
    model, inputs = build_tiny(config_class)
    config = model.config
    found = Derivation(config_class)
    layers_field = config_field(config_class, "num_hidden_layers")
    if layers_field is None:
        raise DerivedAdapterError(f"{config_class.__name__}: no layer-count field ({ALIASES['num_hidden_layers']}).")
    layers_name = find_layers(model, getattr(config, layers_field))
    found.layers_path = relative_layers_path(model, layers_name)
    block = model.get_submodule(layers_name)[0]
    projections = _projections(block)
    hidden = getattr(config, config_field(config_class, "hidden_size") or "hidden_size", None)
    if not isinstance(hidden, int):
        raise DerivedAdapterError(f"{config_class.__name__}: no hidden-size field ({ALIASES['hidden_size']}).")
    _derive_attention(found, model, inputs, block, projections, hidden)
    experts = _experts(model.get_submodule(layers_name))
    if experts:
        try:
            found.experts = derive_experts(model, inputs, layers_name, hidden)
            found.mlp_module = found.experts.moe_module
        except Exception as error:  # a probe's forward may fail too: the MoE kinds are refused, never the rest
            reason = str(error) if isinstance(error, DerivedAdapterError) else f"{type(error).__name__}: {error}"
            found.refuse({"neurons", "mlp_branches", "experts"}, f"mixture-of-experts MLP ({experts}): {reason}")
        else:
            try:
                found.removed_mlp_output = moe_output(model, inputs, layers_name, found.experts)
            except DerivedAdapterError as error:
                found.refuse({"mlp_branches"}, f"mixture-of-experts MLP: {error}")
    else:
        _derive_mlp(found, model, inputs, block, projections, hidden)
    return found, model, inputs


def _experts(layers: nn.ModuleList) -> str | None:
    """The first module of any block whose name says it holds experts (`experts`, `shared_expert`, ...)."""
    for index, block in enumerate(layers):
        for name, _ in block.named_modules():
            if "expert" in name.rpartition(".")[2].lower():
                return f"{index}.{name}"
    return None


def _value(config: PretrainedConfig, canonical: str):
    name = config_field(type(config), canonical)
    return getattr(config, name, None) if name else None


def _derive_attention(found: Derivation, model, inputs, block, projections, hidden: int) -> None:
    config = model.config
    heads = _value(config, "num_attention_heads")
    if not isinstance(heads, int):
        found.refuse(ATTENTION_KINDS, f"no head-count field ({ALIASES['num_attention_heads']})")
        return
    kv_heads = _value(config, "num_key_value_heads") or heads
    head_dims = [d for d in (_value(config, "head_dim"), hidden // heads) if isinstance(d, int) and d > 0]
    for d in dict.fromkeys(head_dims):
        q_width, kv_width = heads * d, kv_heads * d
        outputs = [n for n, (i, o) in projections.items() if i == hidden and o == q_width]
        kv_outputs = [n for n, (i, o) in projections.items() if i == hidden and o == kv_width and kv_width != q_width]
        # the output projection: the H-wide consumer of n·d columns whose input the other projections reach
        candidates = [n for n, (i, o) in projections.items() if i == q_width and o == hidden]
        # fused q/k/v: H → (n + 2m)·d, with m the config's KV heads, or one (multi-query)
        fused = {n: (o - q_width) // (2 * d) for n, (i, o) in projections.items() if i == hidden and o > q_width}
        fused = {n: m for n, m in fused.items() if projections[n][1] == q_width + 2 * m * d and m in (kv_heads, 1)}
        feeders = list(dict.fromkeys(outputs + kv_outputs + list(fused)))
        consumers = [c for c in candidates if any(reach(model, inputs, block, p, 1, c) for p in feeders if p != c)]
        outputs = [n for n in outputs if n not in consumers]
        if len(consumers) == 1 and len(fused) == 1 and not outputs:
            (qkv, m), o = next(iter(fused.items())), consumers[0]
            layout = _fused_layout(model, inputs, block, qkv, o, heads, m, d)
            if layout not in FUSED_LAYOUTS:
                found.refuse(
                    ATTENTION_KINDS, f"fused q/k/v projection {qkv} ({hidden}→{(heads + 2 * m) * d}): {layout}"
                )
                return
            found.qkv_proj, found.qkv_layout, found.o_proj = qkv, layout, o
            _attention_module(found, model, inputs, block, [qkv, o])
            _head_dim_attribute(found, block, d)
            return
        if len(consumers) != 1:
            continue
        if kv_width != q_width and len(outputs) == 1 and len(kv_outputs) == 2:
            q, pair = outputs[0], kv_outputs
        elif kv_width == q_width and len(outputs) == 3:
            q, pair = _hinted(outputs, "q")[0], [n for n in outputs if n != _hinted(outputs, "q")[0]]
        else:
            continue
        o = consumers[0]
        # dataflow: a value channel reaches only its own column of each query head reading it;
        # a key channel reaches its query heads' columns; a query channel its own head's columns.
        group = heads // kv_heads
        channel = d + 1 if kv_heads > 1 else 1  # channel 1 of KV head 1 (or 0)
        kv_head = channel // d
        own_columns = {h * d + channel % d for h in range(kv_head * group, (kv_head + 1) * group)}
        head_columns = set(range(kv_head * group * d, (kv_head + 1) * group * d))
        reached = {name: reach(model, inputs, block, name, channel, o) for name in pair}
        values = [name for name in pair if reached[name] == own_columns]
        keys = [name for name in pair if reached[name] and reached[name] <= head_columns and name not in values]
        query_channel = (channel // d) * d + 1
        query_reach = reach(model, inputs, block, q, query_channel, o)
        if len(values) != 1 or len(keys) != 1 or not query_reach or not query_reach <= set(range(d, 2 * d)):
            found.refuse(
                ATTENTION_KINDS,
                f"{q}, {pair[0]}, {pair[1]} → {o}: the dataflow does not show a query, a key and a value "
                f"(channel {channel} reaches {[sorted(reached[n]) for n in pair]})",
            )
            return
        found.q_proj, found.k_proj, found.v_proj, found.o_proj = q, keys[0], values[0], o
        _attention_module(found, model, inputs, block, [q, keys[0], values[0], o])
        _head_dim_attribute(found, block, d)
        return
    found.refuse(
        ATTENTION_KINDS,
        f"no projections of widths {hidden}→{heads}×d and {heads}×d→{hidden} (d in {head_dims}) in "
        f"{type(block).__name__}; found {projections}",
    )


#: Attention attributes holding the query width `n·d` that fused forwards split by.
WIDTH_ATTRIBUTES = ("split_size", "all_head_size")
#: With a fused q/k/v projection, also this one (GPT-BigCode splits the query off by `embed_dim`).
FUSED_WIDTH_ATTRIBUTES = ("embed_dim",)
#: Fused q/k/v row layouts, as the chunk (of `d` rows) holding each query head `h` and KV head `j`'s key and
#: value, for `n` query heads, `m` KV heads and `G = n / m` query heads per KV head:
#: "blocked" [q_0 … q_n-1 | k_0 … k_m-1 | v_0 … v_m-1] (GPT-2, MPT, GPT-BigCode), "grouped" per KV head
#: [q_jG … q_jG+G-1 k_j v_j] (GPT-NeoX and BLOOM with G = 1, Falcon's GQA layout).
FUSED_LAYOUTS = ("blocked", "grouped")


def fused_chunks(layout: str, n: int, m: int) -> tuple[list[int], list[int], list[int]]:
    """The chunk index of every query head, KV head key and KV head value in the fused projection."""
    if layout == "blocked":
        return list(range(n)), [n + j for j in range(m)], [n + m + j for j in range(m)]
    group = n // m
    queries = [(h // group) * (group + 2) + h % group for h in range(n)]
    return queries, [j * (group + 2) + group for j in range(m)], [j * (group + 2) + group + 1 for j in range(m)]


def _fused_layout(model, inputs, block, qkv: str, o: str, n: int, m: int, d: int) -> str:
    """Which of `FUSED_LAYOUTS` the dataflow shows, else a sentence saying what it shows.

    Noise in channel 1 of each chunk of `d` rows reaches, in `o`'s input columns: a value chunk of KV head
    `j` only column 1 of each of its query heads; a query chunk of head `h` only head `h`'s columns; a key
    chunk of KV head `j` the columns of all its query heads. With one query head per KV head, query and
    key both reach their head's columns only: told apart by the order (q before k), which no cut depends
    on (a head's query, key and value are removed together)."""
    group = n // m
    seen: list[tuple[str, int]] = []
    for chunk in range(n + 2 * m):
        reached = reach(model, inputs, block, qkv, chunk * d + 1, o)
        touched = sorted({c // d for c in reached})
        if touched and reached == {h * d + 1 for h in touched} and len(touched) == group:
            seen.append(("v", touched[0] // group))
        elif len(touched) == 1 and group > 1:
            seen.append(("q", touched[0]))
        elif (
            len(touched) == group
            and touched[0] % group == 0
            and touched == list(range(touched[0], touched[0] + group))
        ):
            seen.append(("qk" if group == 1 else "k", touched[0] // group))
        else:
            return f"chunk {chunk} (rows {chunk * d}…{chunk * d + d - 1}) reaches columns {sorted(reached)} of {o}"
    for layout in FUSED_LAYOUTS:
        queries, keys, values = fused_chunks(layout, n, m)
        expected = [None] * (n + 2 * m)
        for h, chunk in enumerate(queries):
            expected[chunk] = ("qk" if group == 1 else "q", h)
        for j, (key, value) in enumerate(zip(keys, values)):
            expected[key], expected[value] = ("qk" if group == 1 else "k", j), ("v", j)
        if seen == expected:
            return layout
    return f"the chunks of {d} rows are {seen}, neither layout of {FUSED_LAYOUTS}"


def _attention_module(found: Derivation, model, inputs, block, names: list[str]) -> None:
    found.attention_module = _parent(names)
    if not found.attention_module:
        found.refuse({"attention_branches"}, f"the attention projections {names} have no module of their own")
        return
    output = _output_of(model, inputs, block.get_submodule(found.attention_module))
    if isinstance(output, tuple) and len(output) == 2:
        found.removed_attention_output = "zeros_and_none"
    elif isinstance(output, torch.Tensor):
        found.removed_attention_output = "zeros"
    else:
        found.refuse({"attention_branches"}, f"{found.attention_module} returns {type(output).__name__}")


def _head_dim_attribute(found: Derivation, block: nn.Module, head_dim: int) -> None:
    """The module (under the attention module) and integer attribute holding the head size."""
    root = block.get_submodule(found.attention_module) if found.attention_module else block
    prefix = f"{found.attention_module}." if found.attention_module else ""
    for name, module in root.named_modules():
        for attribute in ("head_dim", "head_size", "attention_head_size", "d_head"):
            if getattr(module, attribute, None) == head_dim and not isinstance(getattr(module, attribute), bool):
                found.heads_module = (prefix + name).rstrip(".") or None
                found.head_dim_attribute = attribute
                return
    found.refuse(
        ATTENTION_KINDS - {"attention_branches"},
        f"no attribute of {found.attention_module or 'the block'} holds the head size {head_dim}",
    )


def _output_of(model, inputs, module: nn.Module):
    seen = []
    handle = module.register_forward_hook(lambda m, a, output: seen.append(output))
    model_output(model, inputs)
    handle.remove()
    return seen[0] if seen else None


def _derive_mlp(found: Derivation, model, inputs, block, projections, hidden: int) -> None:
    size = _value(model.config, "intermediate_size")
    mlp_kinds = {"neurons", "mlp_branches"}
    if not isinstance(size, int):  # a width the class derives (4·H, mlp_ratio·H): read from the shapes
        widths = {i for n, (i, o) in projections.items() if o == hidden and i != hidden and n != found.o_proj}
        widths = [x for x in widths if 1 <= sum(i == hidden and o == x for i, o in projections.values()) <= 2]
        if len(widths) != 1:
            found.refuse(
                mlp_kinds,
                f"no intermediate-size field ({ALIASES['intermediate_size']}), and the shapes of "
                f"{type(block).__name__} show no one MLP width ({sorted(widths)})",
            )
            return
        size = widths[0]
    producers = [n for n, (i, o) in projections.items() if i == hidden and o == size]
    consumers = [n for n, (i, o) in projections.items() if i == size and o == hidden]
    fused = [n for n, (i, o) in projections.items() if i == hidden and o == 2 * size]
    if len(consumers) != 1 or len(producers) not in (1, 2):
        detail = f"; fused gate/up projection {fused[0]} (not derived yet)" if fused else ""
        found.refuse(
            mlp_kinds,
            f"expected one or two projections {hidden}→{size} and one {size}→{hidden} in {type(block).__name__}, "
            f"found {producers} and {consumers}{detail}",
        )
        return
    down = consumers[0]
    for name in producers:  # a neuron of each producer reaches only its own down-projection column
        reached = reach(model, inputs, block, name, 1, down)
        if reached != {1}:
            found.refuse(mlp_kinds, f"neuron 1 of {name} reaches columns {sorted(reached)} of {down}, not only 1")
            return
    if len(producers) == 2:
        found.gate_proj, found.up_proj = _hinted(producers, "gate")
    else:
        found.up_proj = producers[0]
    found.down_proj = down
    found.mlp_module = _parent([*producers, down])
    if not found.mlp_module:
        found.refuse({"mlp_branches"}, f"the MLP projections {[*producers, down]} have no module of their own")
        return
    output = _output_of(model, inputs, block.get_submodule(found.mlp_module))
    if not isinstance(output, torch.Tensor):
        found.refuse({"mlp_branches"}, f"{found.mlp_module} returns {type(output).__name__}, not a tensor")
    found.mlp_adds_to_stream = _adds_to_stream(model, inputs, block, down)


def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def _adds_to_stream(model, inputs, block: nn.Module, name: str) -> bool:
    """Whether `name`'s output reaches the block's output unchanged: the block computes `h + name(...)`.

    A random offset `δ` added to the projection's output must move the block's output by exactly `δ`
    (relative error below 1e-5); a norm after the MLP (Gemma-2's `post_feedforward_layernorm`), a scale
    or a parallel branch summed later fails the test. The removed-layer and stream repairs rely on it.
    """
    outputs, offset = [], {}

    def shift(module, args, output):
        if "delta" not in offset:
            offset["delta"] = torch.randn(output.shape, generator=torch.Generator().manual_seed(0), dtype=output.dtype)
        return output + offset["delta"] if offset.get("on") else output

    capture = block.register_forward_hook(lambda m, a, output: outputs.append(_first_tensor(output)))
    handle = block.get_submodule(name).register_forward_hook(shift)
    try:
        model_output(model, inputs)
        offset["on"] = True
        model_output(model, inputs)
    finally:
        handle.remove()
        capture.remove()
    if len(outputs) != 2 or outputs[0].shape != offset["delta"].shape:
        return False
    moved = outputs[1] - outputs[0]
    return bool((moved - offset["delta"]).abs().max() <= 1e-5 * offset["delta"].abs().max())


# --------------------------------------------------------------------------- the adapter
class DerivedAdapter(ArchitectureAdapter):
    """An adapter whose names come from a verified `Derivation` rather than a hand-written file."""

    def __init__(self, derivation: Derivation, model_type: str):
        self.derivation = derivation
        self.model_types = (model_type,)
        for name in (
            "layers_path",
            "attention_module",
            "mlp_module",
            "q_proj",
            "qkv_proj",
            "qkv_layout",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "heads_module",
            "head_dim_attribute",
            "removed_attention_output",
            "removed_mlp_output",
            "mlp_adds_to_stream",
        ):
            setattr(self, name, getattr(derivation, name))
        self.kinds = derivation.kinds
        self.expert_layout = derivation.experts
        #: kind → why it was refused (shown when a refused kind is asked for)
        self.refused = dict(derivation.refused)

    def has_branch(self, layer: nn.Module, branch) -> bool:
        """A branch derivation did not resolve (no module or no consumer) is invisible: never touched."""
        name, consumer = (
            (self.attention_module, self.o_proj) if branch == "attention" else (self.mlp_module, self.down_proj)
        )
        consumer = consumer or (self.expert_layout if branch == "mlp" else None)
        return name is not None and consumer is not None and super().has_branch(layer, branch)

    def attention_geometry(self, layer: nn.Module) -> AttentionGeometry | None:
        if (self.q_proj is None and self.qkv_proj is None) or "heads" not in self.kinds:
            return None  # attention left untouched: its kinds are refused
        geometry = super().attention_geometry(layer)
        if geometry is None or self.qkv_proj is None:
            return geometry
        d, n = geometry.head_dim, geometry.num_heads
        m = (out_features(layer.get_submodule(self.qkv_proj)) - n * d) // (2 * d)
        return AttentionGeometry(n, m, d)

    def _qkv(self, layer: nn.Module, geometry: AttentionGeometry, part: int, head: int) -> list[TensorSlice]:
        d = geometry.head_dim
        chunk = fused_chunks(self.qkv_layout, geometry.num_heads, geometry.num_kv_heads)[part][head]
        return output_slices(layer, self.qkv_proj, chunk * d, (chunk + 1) * d)

    def query_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, head: int) -> list[TensorSlice]:
        if self.qkv_proj is None:
            return super().query_head_slices(layer, geometry, head)
        d = geometry.head_dim
        return self._qkv(layer, geometry, 0, head) + input_slices(layer, self.o_proj, head * d, (head + 1) * d)

    def kv_head_slices(self, layer: nn.Module, geometry: AttentionGeometry, kv_head: int) -> list[TensorSlice]:
        if self.qkv_proj is None:
            return super().kv_head_slices(layer, geometry, kv_head)
        return self._qkv(layer, geometry, 1, kv_head) + self._qkv(layer, geometry, 2, kv_head)

    def intermediate_size(self, layer: nn.Module) -> int | None:
        if self.experts_of(layer):
            return super().intermediate_size(layer)
        return super().intermediate_size(layer) if self.down_proj and "neurons" in self.kinds else None

    def set_attention_geometry(self, layer: nn.Module, geometry: AttentionGeometry) -> None:
        """The generic head attributes, and a layer-local config copy for forwards that read head counts from it."""
        super().set_attention_geometry(layer, geometry)
        heads = layer.get_submodule(self.heads_module or self.attention_module)
        for names, value in (
            (ALIASES["num_attention_heads"], geometry.num_heads),
            (ALIASES["num_key_value_heads"], geometry.num_kv_heads),
            (
                WIDTH_ATTRIBUTES + (FUSED_WIDTH_ATTRIBUTES if self.qkv_proj else ()),
                geometry.num_heads * geometry.head_dim,
            ),
        ):
            for name in names:  # what forwards split or reshape by: n_head (MPT), split_size (GPT-2 style)
                if type(getattr(heads, name, None)) is int:
                    setattr(heads, name, value)
        for name in {self.attention_module, self.heads_module} - {None}:
            module = layer.get_submodule(name)
            config = getattr(module, "config", None)
            if isinstance(config, PretrainedConfig):
                module.config = copy.copy(config)
                for canonical, value in (
                    ("num_attention_heads", geometry.num_heads),
                    ("num_key_value_heads", geometry.num_kv_heads),
                ):
                    field_name = config_field(type(config), canonical)
                    if field_name and hasattr(config, field_name):
                        setattr(module.config, field_name, value)

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        """The fields holding each pruned shape, named as the config class names them."""
        fields = {}
        attention = geometry.attention
        values = {"intermediate_size": geometry.intermediate_size}
        layout = self.expert_layout
        if geometry.experts is not None and layout is not None:  # an MoE layer: the expert count and width
            values = {}
            fields |= {layout.count_field: geometry.experts} if layout.count_field else {}
            fields |= {layout.width_field: geometry.intermediate_size} if layout.width_field else {}
        if attention is not None and "heads" in self.kinds:
            values |= {
                "num_attention_heads": attention.num_heads,
                "num_key_value_heads": attention.num_kv_heads,
                "head_dim": attention.head_dim,
            }
        for canonical, value in values.items():
            name = config_field(type(config), canonical)
            if name and value is not None and (canonical != "head_dim" or getattr(config, name, None) is not None):
                if canonical == "num_key_value_heads" and getattr(config, name, None) is None:
                    continue  # MHA families whose config has no KV field set
                fields[name] = value
        return fields

    def layer_count_field(self, config: PretrainedConfig) -> str:
        """The field counting this stack's layers: the one layer-count field named like the stack (BART's
        `decoder_layers` for `decoder.layers`), else the config's `num_hidden_layers`."""
        stack = set(re.split(r"[._]", self.layers_path)) - {"layers", "layer", "h", "blocks"}
        named = [
            key
            for key, value in vars(config).items()
            if re.fullmatch(LAYER_COUNT, key) and type(value) is int and set(key.split("_")) & stack
        ]
        return named[0] if len(named) == 1 else config_field(type(config), "num_hidden_layers")

    def update_config_for_layers(self, config: PretrainedConfig, kept_layers: list[int]) -> None:
        """The layer-count field, and every per-layer list (a `*layer*` field as long as the old count)."""
        name = self.layer_count_field(config)
        old_count = getattr(config, name)
        setattr(config, name, len(kept_layers))
        for key, value in list(vars(config).items()):
            if re.search(r"layer|window", key) and isinstance(value, (list, tuple)) and len(value) == old_count:
                setattr(config, key, type(value)(value[i] for i in kept_layers))
        stages = getattr(config, "stage_names", None)
        if isinstance(stages, list) and len(stages) == old_count + 1 and hasattr(config, "out_indices"):
            # a backbone config names the stem and each layer's output: kept outputs follow their layer
            kept = [i for i in config.out_indices or () if i == 0 or i - 1 in kept_layers]
            config.stage_names = stages[: len(kept_layers) + 1]
            indices = [0 if i == 0 else 1 + kept_layers.index(i - 1) for i in kept]
            config.set_output_features_output_indices(None, indices or None)
        if getattr(config, "max_window_layers", None) is not None:
            config.max_window_layers = sum(1 for i in kept_layers if i < min(config.max_window_layers, old_count))
