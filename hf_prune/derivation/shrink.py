"""The generic shrink rule: a tiny random instance of any config class, built from the class's defaults.

Canonical fields (`fields.ALIASES`) take `TINY`'s values; every other integer field that sizes a weight is capped
by what its name says it sizes (`SIZE_FIELDS`, `WIDTHS`); per-stage lists are scaled by one power of two; nested
configs the same way. No per-type config: a tiny model the rule cannot build is a typed refusal.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.models.auto import modeling_auto

from ..errors import DerivedAdapterError
from .fields import config_field, default_values
from .probes import first_line, model_output

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
#: The KV head counts a tiny instance is tried with: `TINY`'s (grouped queries), then one per query head, for
#: attention whose forward has no grouped queries (multi-head latent attention repeats no KV heads).
KV_HEADS = (TINY["num_key_value_heads"], TINY["num_attention_heads"])
#: The hidden sizes tried, in order, where `TINY`'s leaves the tiny model too large (hierarchical vision models
#: whose stages double the first stage's width: Swin's `embed_dim * 2**i`).
NARROW_HIDDEN = (32, 16)
#: A tiny instance larger than this means the shrink missed a field: refused rather than built.
MAX_TINY_PARAMETERS = 2_000_000
#: Task heads tried, in order, for the tiny instance (the layers live in the base model either way).
_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING",
    "MODEL_FOR_MASKED_LM_MAPPING",
    "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING",
    "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
    "MODEL_MAPPING",
)


#: The generic shrink rule for every other integer field, by what its name says it sizes (first match wins;
#: a field is only ever made smaller). Applied to the config and, recursively, to every nested config.
#: `None`: left as it is (ids, indices, windows, ...); an int: the cap; "layers" follows `TINY`'s layer count.
LAYER_COUNT = r"(?:num_|n_)?(?:[a-z]+_)?layers?"
SIZE_FIELDS: tuple[tuple[str, int | str | None], ...] = (
    (
        r"token|_id$|_ids$|index|seed|divisible|offset|window|chunk|bucket|distance|sampl|length|scal|stride|kernel",
        None,
    ),
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
    (r"intermediate|ffn|d_ff|dff|dim_ff|inner|mlp|feed_forward", TINY["intermediate_size"]),
    (r"rank", 20),
    (r"state", 16),
    (r"", TINY["hidden_size"]),
)


def _role(name: str, head_dim: int, hidden: int = TINY["hidden_size"]) -> int | None:
    """The cap `SIZE_FIELDS` / `WIDTHS` give an integer field called `name`, or None (left as it is); a hidden
    width takes `hidden` (`NARROW_HIDDEN`)."""
    for pattern, role in SIZE_FIELDS:
        hit = re.fullmatch(pattern, name) if role == "layers" else re.search(pattern, name)
        if hit and role == "width":
            pattern, cap = next((width, cap) for width, cap in WIDTHS if re.search(width, name))
            return head_dim if cap == TINY["head_dim"] else hidden if pattern == "" else cap
        if hit:
            return TINY["num_hidden_layers"] if role == "layers" else role
    return None


#: The hidden size of the proportional shrink: a multiple of 6 and of `TINY`'s head count (LayoutLMv3 splits the
#: hidden size into 4 coordinate and 2 shape embeddings, LiLT's layout stream into sixths).
PROPORTIONAL_HIDDEN = 96


#: The last shrinks `build_tiny` tries, in order, where every other one fails (`ShrinkRule` settings): the
#: proportional shrink (hidden sizes split in sixths: LayoutLMv3, LiLT), then the channel shrink of
#: convolutional configs (`_channel_width`; HGNetV2, TextNet, EfficientNet).
LAST_SHRINKS = ({"hidden": PROPORTIONAL_HIDDEN, "proportional": True}, {"channels": True})


def _proportional(name: str, value: int, default_hidden, hidden: int) -> int | None:
    """`value · hidden / default_hidden` for a width no name pattern places (`SIZE_FIELDS`' catch-all: it would
    become the hidden size) that divides the default hidden size into an integer share of the tiny one
    (LayoutLMv3's `coordinate_size` 128 of 768 → 16 of 96), else None."""
    if not isinstance(default_hidden, int) or not 0 < value < default_hidden or default_hidden % value:
        return None
    if _role(name, 0, hidden=-1) != -1 or (value * hidden) % default_hidden:
        return None
    return value * hidden // default_hidden


def _channel_width(name: str, value: int, factor: int, width_ratio: float) -> int | None:
    """The channel shrink of a convolutional config (`ShrinkRule.channels`) for one integer field, or None
    where it does not apply: a `*_channels` count (not the image's, `IMAGE_CHANNELS`) is divided by the
    per-stage width lists' `factor` (TextNet's `stem_out_channels` opens its `hidden_sizes`); a width no name
    pattern places (the catch-all would make it the hidden size) narrows with the width multiplier, where the
    result is whole (EfficientNet's `hidden_dim` 2560 = 1280 · 2.0 becomes 320 = 1280 · 0.25)."""
    if re.search(r"channels$", name) and not re.search(IMAGE_CHANNELS, name):
        return max(1, value // factor)
    if width_ratio < 1 and _role(name, 0, hidden=-1) == -1 and (value * width_ratio).is_integer():
        return max(1, int(value * width_ratio))
    return None


#: The widest entry of a per-stage width list (`hidden_sizes`, `embed_dims`, `in_channels`, ...) after shrinking.
LIST_WIDTH = 128
#: The variants of the shrink tried, in order, where the class refuses the plain one (one change each): per-stage
#: width lists up to 256 wide (MobileViT's widths must stay multiples of its heads), `SCALED` floats left as they
#: are (Hiera), per-layer lists keeping their last entries (NeoMME's pattern ends in a full-attention layer).
VARIANTS = ({}, {"list_width": 2 * LIST_WIDTH}, {"scaled": False}, {"tail": True})
#: Per-stage list fields left as they are (kernels, patches, strides, ratios, ...), then those holding depths.
LIST_KEPT = SIZE_FIELDS[0][0] + r"|kernel|patch|padding|pad|image|ratio|shape|train_size|level|scales|rates"
LIST_DEPTHS = r"depth|repeat|blocks|layers"


#: Float fields that scale every width or depth of a convolutional family (`depth_multiplier`, `width_coefficient`).
SCALED = r"multiplier|coefficient"
#: Integer fields holding the input image's channel count (`num_channels`, TextNet's `stem_num_channels`).
IMAGE_CHANNELS = r"num_channels$"
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


def _shrink_list(key: str, value: list[int], factor: int, image_channels: int | None = None) -> list[int]:
    """The generic shrink rule for per-stage integer lists (convolutional and hierarchical vision configs):
    widths divided by `factor` (one power of two for every width list of the config, so the widest entry is
    at most `LIST_WIDTH` and every ratio and equality between lists holds, as `in_channels[i + 1] ==
    out_channels[i]`), depths capped at 2, head counts rounded down to a power of two at most `TINY`'s;
    every other list (kernels, strides, ratios, ...) is left as it is. With `image_channels`, a width equal to
    it is the image's channel count and stays (HGNetV2's `stem_channels` open with the input's 3)."""
    if _width_list(key, value):
        return [v if v == image_channels else max(1, v // factor) for v in value]
    if re.search(LIST_KEPT, key):
        return value
    if re.search(LIST_DEPTHS, key):
        return [min(v, 2) for v in value]
    if re.search(r"heads?$", key):
        return [1 << (min(v, TINY["num_attention_heads"]).bit_length() - 1) for v in value]
    return value


@dataclass(frozen=True)
class ShrinkRule:
    """The settings of one shrink (`_tiny_config` documents each); nested configs are shrunk by the same rule."""

    head_dim: int
    shape_dims: frozenset = frozenset()
    kv_heads: int = TINY["num_key_value_heads"]
    fill: bool = False
    hidden: int = TINY["hidden_size"]
    list_width: int = LIST_WIDTH
    scaled: bool = True
    tail: bool = False
    proportional: bool = False
    channels: bool = False


def _shrink(config_class, values: dict, rule: ShrinkRule, changed: dict, path: str):
    """Shrink one (possibly nested) config dict in place: the fields `ALIASES` names to `TINY`, every other
    integer size field to at most its `SIZE_FIELDS` cap, per-layer lists and `{layer: ...}` dicts to the new
    layer count, token ids into the small vocabulary; nested configs (dicts of the class's `sub_configs`, or
    holding a `model_type`) the same way."""
    old, canonical_names = dict(values), set()
    if config_class is not None:  # the canonical fields take `TINY`'s values exactly (set even where None)
        for canonical, value in TINY.items():
            name = config_field(config_class, canonical)
            if name is not None and not _int_list(values.get(name)):  # per-stage lists: `_shrink_list`
                values[name] = {
                    "head_dim": rule.head_dim,
                    "num_key_value_heads": rule.kv_heads,
                    "hidden_size": rule.hidden,
                }.get(canonical, value)
                canonical_names.add(name)
    sub_configs = getattr(config_class, "sub_configs", None) or {}
    hidden_name = config_field(config_class, "hidden_size") if config_class is not None else None
    default_hidden = old.get(hidden_name) if hidden_name else None
    widest = max((max(v) for k, v in values.items() if _width_list(k, v)), default=0)
    factor = 1
    while widest // factor > rule.list_width:
        factor *= 2
    image_channels = values.get("num_channels") if rule.channels else None
    width_ratio = 1.0  # `rule.channels`: how much the shrink narrows a width multiplier (EfficientNet's 2.0 → 0.25)
    for key, value in values.items():
        if rule.channels and rule.scaled and isinstance(value, float) and value > 0 and re.search(SCALED, key):
            width_ratio = min(value, 0.25) / value if "width" in key else width_ratio
    for key in canonical_names if rule.channels else ():  # EfficientNet's `hidden_dim` is no MLP width there
        if type(old.get(key)) is int and (width := _channel_width(key, old[key], factor, width_ratio)) is not None:
            values[key] = width
    for key, value in list(values.items()):
        if isinstance(value, dict) and (key in sub_configs or "model_type" in value):
            sub_class = sub_configs.get(key)
            sub_class = sub_class if isinstance(sub_class, type) and issubclass(sub_class, PretrainedConfig) else None
            _shrink(sub_class, value, rule, changed, f"{path}{key}.")
        elif key not in canonical_names and isinstance(value, int) and not isinstance(value, bool):
            cap = _role(key, rule.head_dim, rule.hidden)
            if cap is None and value in rule.shape_dims and not any(re.search(p, key) for p, _ in SIZE_FIELDS[:1]):
                cap = SHAPE_CAP  # no name says what it sizes, but a parameter shape shows it does
            share = _proportional(key, value, default_hidden, rule.hidden) if rule.proportional else None
            width = _channel_width(key, value, factor, width_ratio) if rule.channels else None
            if share is not None or width is not None:
                values[key] = share if share is not None else width
            elif isinstance(cap, int) and value > cap:
                values[key] = cap
        elif rule.channels and re.search(IMAGE_SIZE, key) and _int_list(value):  # TextNet's (640, 640)
            values[key] = [min(v, TINY["hidden_size"]) for v in value]  # as an integer image size becomes
        elif key not in canonical_names and _int_list(value):
            values[key] = _shrink_list(key, value, factor, image_channels)
        elif isinstance(value, float) and re.search(SCALED, key) and rule.scaled:
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
                values[key] = value[before - after :] if rule.tail else value[:after]
            elif isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
                values[key] = {k: v for k, v in value.items() if int(k) < after}
    _ids_follow_tables(values, old)
    if rule.fill:
        fill_defaults(values)
    for key, value in values.items():
        if isinstance(old.get(key), int) and isinstance(value, int) and old[key] != value and not key.endswith("_id"):
            changed[path + key] = (old[key], value)


#: Words an id field's name shares with any table's name (`tag_pad_id`, `max_xpath_tag_unit_embeddings`).
_ID_WORDS = {"id", "pad", "token", "index", "max", "num", "size"}


def _ids_follow_tables(values: dict, old: dict) -> None:
    """An id into a table the shrink made smaller stays inside it: `tag_pad_id` 216 of the 256
    `max_xpath_tag_unit_embeddings` becomes 31 when the table is capped at 32 (the table is the changed
    integer field whose name shares a word with the id's, other than `_ID_WORDS`)."""
    for key, value in values.items():
        if not key.endswith("_id") or key.endswith("token_id") or type(value) is not int:
            continue
        words = set(key.split("_")) - _ID_WORDS
        for table, size in values.items():
            before = old.get(table)
            if (
                type(size) is int
                and type(before) is int
                and size < before
                and words & set(table.split("_"))
                and size <= value < before
            ):
                value = values[key] = size - 1


#: The id a filled `pad_token_id` takes: below the tiny tokens (`tiny_inputs` draws them from 3 up).
FILLED_PAD_ID = 0


def fill_defaults(values: dict) -> bool:
    """Fill the defaults a forward needs but the class leaves unset (tried only after the forward refused the
    unfilled config): a `pad_token_id` of None (ESM's position ids count the tokens that are not padding)
    takes `FILLED_PAD_ID`, a `default_<x>` of None the first entry of the list `<x>s` (X-MOD's
    `default_language` of its `languages`). Returns whether it changed anything."""
    filled = False
    if "pad_token_id" in values and values["pad_token_id"] is None:
        values["pad_token_id"], filled = FILLED_PAD_ID, True
    for key, value in list(values.items()):
        choices = values.get(key.removeprefix("default_") + "s")
        if key.startswith("default_") and value is None and isinstance(choices, (list, tuple)) and choices:
            values[key], filled = choices[0], True
    return filled


def tiny_config(config_class: type[PretrainedConfig], head_dim: int = TINY["head_dim"]) -> PretrainedConfig:
    """The class's defaults shrunk by one generic rule: `TINY` for the fields `ALIASES` names, `SIZE_FIELDS`
    for every other integer field that sizes a weight (nested configs too); per-layer lists keep their
    first entries. `changed_fields` says which fields it changed."""
    config, _ = _tiny_config(config_class, head_dim)
    return config


def _tiny_config(
    config_class, head_dim: int, shape_dims: frozenset = frozenset(), **options
) -> tuple[PretrainedConfig, dict]:
    """`tiny_config` and the changed fields; with `shape_dims` (the dimensions of the parameter shapes of a
    first tiny model too large), also every integer field no name pattern covers whose value is one of them;
    with `fill`, the unset defaults `fill_defaults` fills; `hidden`: the hidden size (`NARROW_HIDDEN`);
    `list_width`: the widest entry of a per-stage width list (`LIST_WIDTHS`); `scaled`: whether `SCALED` floats
    are capped (not where the class refuses them: Hiera's `embed_dim_multiplier` grows each stage's width);
    `tail`: per-layer lists keep their last entries, not their first (a pattern of sliding-window layers that
    ends in a full-attention one: NeoMME refuses three sliding ones); `proportional`: widths no name pattern
    places that divide the default hidden size keep their share of it (`_proportional`); `channels`: the
    convolutional widths outside the per-stage lists follow them (`_channel_width`), list entries equal to
    the image's channel count stay, and an image size given as a list is capped like an integer one."""
    values = copy.deepcopy(default_values(config_class))
    changed: dict[str, tuple[int, int]] = {}
    _shrink(config_class, values, ShrinkRule(head_dim, shape_dims, **options), changed, "")
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
    """Random pixels of the (vision) config's size, else random tokens (and decoder tokens where the forward
    takes them: an encoder-decoder does not derive them without a `decoder_start_token_id`)."""
    generator = torch.Generator().manual_seed(1)
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        vision = getattr(config, "vision_config", None) or config  # CLIP-like: the vision tower's own size
        size, channels = getattr(vision, "image_size", 32), getattr(vision, "num_channels", 3)
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}
    tokens = torch.randint(3, TINY["vocab_size"], (2, 7), generator=generator)
    eos = getattr(config, "eos_token_id", None)
    if type(eos) is int and 0 <= eos < TINY["vocab_size"]:  # sequence classifiers pool at the end of sequence
        tokens[:, -1] = eos
    if "decoder_input_ids" in inspect.signature(model.forward).parameters:  # encoder-decoder: the decoder reads them
        return {"input_ids": tokens, "decoder_input_ids": tokens.flip(-1)}
    return {"input_ids": tokens}


def grown_pixels(model: nn.Module, inputs: dict, factor: int = 2) -> dict[str, torch.Tensor] | None:
    """Random pixels `factor` times as high and wide as `inputs`' (the same seed), for a forward whose last
    stage sees too few positions on the tiny ones; None where the forward refuses them."""
    pixels = inputs["pixel_values"]
    generator = torch.Generator().manual_seed(1)
    shape = (*pixels.shape[:-2], pixels.shape[-2] * factor, pixels.shape[-1] * factor)
    grown = {**inputs, "pixel_values": torch.randn(shape, generator=generator, dtype=pixels.dtype)}
    try:
        model_output(model, grown)
    except Exception:  # a size the model refuses (a fixed position table)
        return None
    return grown


def processor_inputs(model: nn.Module, config: PretrainedConfig) -> dict[str, torch.Tensor] | None:
    """Pixels prepared by the model type's own image processor (transformers' auto mapping, each backend in
    turn) from two random images, for forwards that refuse plain `(batch, channels, height, width)` pixels
    (SigLIP-2's patch-packed pixels with their attention mask and spatial shapes). Processor arguments
    that name a field of the (vision) config take its value (`patch_size`); None where no processor
    builds inputs."""
    from transformers.models.auto import image_processing_auto

    names = image_processing_auto.IMAGE_PROCESSOR_MAPPING_NAMES.get(config.model_type) or {}
    names = names.values() if isinstance(names, dict) else [names]
    vision = getattr(config, "vision_config", None) or config
    size = getattr(vision, "image_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(getattr(vision, "num_channels", 3), size, size, generator=generator) for _ in range(2)]
    for name in names:
        try:
            processor_class = image_processing_auto.get_image_processor_class_from_name(name)
            accepted = inspect.signature(processor_class.__init__).parameters
            fields = {key: getattr(vision, key) for key in accepted if key != "self" and hasattr(vision, key)}
            processed = processor_class(**fields)(images=images, return_tensors="pt")
            return {key: value for key, value in processed.items() if isinstance(value, torch.Tensor)}
        except Exception:  # a backend not installed, or arguments it refuses: the next backend
            continue
    return None


def _checked_pixels(
    model: nn.Module, config: PretrainedConfig, inputs: dict, processor: bool = True
) -> dict[str, torch.Tensor]:
    """`inputs` where the forward takes them, else the image processor's (`processor_inputs`) where it takes
    those; else `inputs` (the caller's forward raises the first refusal)."""
    try:
        model_output(model, inputs)
        return inputs
    except Exception:
        processed = processor_inputs(model, config) if processor else None
    if processed is None:
        return inputs
    try:
        model_output(model, processed)
    except Exception:
        return inputs
    return processed


#: Config fields holding the input image's size.
IMAGE_SIZE = r"^(?:image_size|img_size)$"


def _has_image_size(values: dict) -> bool:
    return any(
        re.search(IMAGE_SIZE, str(key)) or (isinstance(value, dict) and _has_image_size(value))
        for key, value in values.items()
    )


#: The factors the shrunk image size is grown by, in order, where the forward refuses it (capped at the default).
IMAGE_GROWTH = (2, 4)


def _grown_image_size(config: PretrainedConfig, defaults: dict, factor: int) -> None:
    """The image sizes of `config` (and its nested configs) times `factor`, at most the class's defaults:
    windowed attention whose windows must fit the last stage's feature map (Swin's relative position table is
    built for its window, and `image_size / patch_size / 2**(stages - 1)` must not fall below it)."""
    for key, value in defaults.items():
        current = getattr(config, key, None)
        image = re.search(IMAGE_SIZE, str(key))
        if image and type(value) is int and type(current) is int:
            setattr(config, key, min(value, current * factor))
        elif image and isinstance(value, (list, tuple)) and isinstance(current, (list, tuple)):
            setattr(config, key, type(current)(min(v, c * factor) for v, c in zip(value, current)))
        elif isinstance(value, dict) and isinstance(current, PretrainedConfig):
            _grown_image_size(current, value, factor)


def build_tiny(config_class: type[PretrainedConfig], seed: int = 0) -> tuple[nn.Module, dict]:
    """A tiny random instance (eval mode; norms and biases perturbed so masking bugs show) and its inputs.

    The config is `tiny_config`'s; where the class refuses a head size of its own (`d_head` must be
    `d_model / n_head`), or the model's forward does (a rotary width that must equal the head size, an output
    projection sized by the hidden size), it is retried with `head_dim` = `hidden_size / num_attention_heads`,
    then both with one KV head per query head (`KV_HEADS`), then, where the class leaves defaults unset that
    its forward needs (`fill_defaults`), all of them again with those filled; then all of them with the class's
    image size grown (`_grown_image_size`); last with the proportional shrink, then the channel shrink
    (`LAST_SHRINKS`). The model is built on the meta device first to count its parameters without allocating
    them (`tiny_size`)."""
    first = None
    attempts = [(head_dims, kv_heads, False) for kv_heads in KV_HEADS for head_dims in (HEAD_DIMS, HEAD_DIMS[1:])]
    if fill_defaults(copy.deepcopy(default_values(config_class))):
        attempts += [(head_dims, kv_heads, True) for head_dims, kv_heads, _ in attempts]
    growth = _has_image_size(default_values(config_class))
    if growth:  # windows that need a larger resolution (Swin)
        attempts += [(*base, factor) for factor in IMAGE_GROWTH for base in attempts]
    attempts += [(HEAD_DIMS, kv_heads, False, None, shrink) for shrink in LAST_SHRINKS for kv_heads in KV_HEADS]
    for attempt, (head_dims, kv_heads, fill, *rest) in enumerate(attempts):
        image = [rest[0]] if rest and rest[0] is not None else []
        shrink = rest[1] if len(rest) > 1 else {}
        try:
            model_class = tiny_model_class(config_class)
            config, shape_fields = tiny_size(config_class, model_class, head_dims, kv_heads, fill, shrink)
            if image:
                _grown_image_size(config, default_values(config_class), image[0])
            if shape_fields:
                warnings.warn(f"{config_class.__name__}: shrunk by parameter shape only: {shape_fields}", stacklevel=2)
            torch.manual_seed(seed)
            model = model_class(config).eval()
            with torch.no_grad():
                for name, parameter in model.named_parameters():
                    if "norm" in name.lower() or name.endswith("bias"):
                        parameter.add_(0.1 * torch.randn_like(parameter))
            inputs = tiny_inputs(model, config)
            if "pixel_values" in inputs:  # pixels the forward refuses: its image processor's, where it takes those
                # (at its own size, often large: only with the largest grown image size, where sizes grow)
                processor = not growth or image == [IMAGE_GROWTH[-1]]
                inputs = _checked_pixels(model, config, inputs, processor=processor)
            if attempt < len(attempts) - 1:  # a shape the forward refuses: the next attempt
                model_output(model, inputs)
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


def tiny_size(
    config_class,
    model_class,
    head_dims: tuple[int, ...] = HEAD_DIMS,
    kv_heads: int = TINY["num_key_value_heads"],
    fill: bool = False,
    shrink: dict | None = None,
) -> tuple[PretrainedConfig, dict]:
    """The tiny config whose meta-built model is under `MAX_TINY_PARAMETERS`, and the fields only the
    parameter shapes named (see `tiny_config`'s `shape_dims`); a typed refusal when none is. `shrink`: settings
    of the rule (`ShrinkRule`) every variant takes (`LAST_SHRINKS`)."""
    error = None
    variants = [{**variant, **(shrink or {})} for variant in VARIANTS]
    for head_dim, variant in ((d, v) for d in head_dims for v in variants):
        try:
            config, changed = _tiny_config(config_class, head_dim, kv_heads=kv_heads, fill=fill, **variant)
            size, dims = meta_size(model_class, config)
        except Exception as caught:  # a divisibility or consistency check of the class: the next head size or
            error = error or caught  # list width (MobileViT's stage widths must stay multiples of its heads)
            continue
        if size <= MAX_TINY_PARAMETERS:
            return config, {}
        before = changed
        config, changed = _tiny_config(
            config_class, head_dim, frozenset(dims), kv_heads=kv_heads, fill=fill, **variant
        )
        size, _ = meta_size(model_class, config)
        if size <= MAX_TINY_PARAMETERS:
            return config, {key: value for key, value in changed.items() if key not in before}
        for hidden in NARROW_HIDDEN:  # stages that double the hidden size (Swin's `embed_dim * 2**i`)
            try:
                config, _ = _tiny_config(
                    config_class, head_dim, kv_heads=kv_heads, fill=fill, **{**variant, "hidden": hidden}
                )
                narrow, _ = meta_size(model_class, config)
            except Exception:  # a divisibility check of the class: the next width
                continue
            if narrow <= MAX_TINY_PARAMETERS:
                return config, {}
        raise DerivedAdapterError(
            f"{config_class.__name__}: the generic shrink leaves {size:,} parameters (> {MAX_TINY_PARAMETERS:,}): "
            "some width or count field of this config is not one `SIZE_FIELDS` knows, nor a parameter shape shows."
        )
    raise error
