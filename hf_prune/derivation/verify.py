"""Verify a derived adapter before use: every kind it claims is cut on the tiny instance and compared.

For each kind, a seeded random plan (one query head of every KV group, one KV group, a quarter of
the neurons, one layer (and, separately, the first), the attention of layer 0, the MLP of layer 1) is
applied twice to copies of the tiny model: by `masking.apply_masks` (the reference) and by
`surgery.apply_plan` (the cut). The kind stays only if the cut removes exactly the plan's parameter
count and its output equals the masked one within 1e-5, and if the saved cut reloads to equal outputs:
with plain `from_pretrained` where `decide_format` finds the config fields that express it (vanilla),
else in the loader format with `load_pruned`. A kind that fails is refused with the reason.
"""

from __future__ import annotations

import copy
import functools
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils import logging as hf_logging

from ..calibration.distributed import is_main_process
from ..errors import DerivedAdapterError
from ..groups.base import set_config_field
from ..groups.experts import EXPERT_WIDTH_MULTIPLE
from ..groups.registry import supported_model_types
from ..kinds import GroupKind
from ..masking import apply_masks
from ..output.checkpoint import decide_format, load_pruned, write_loader_config
from ..plan import PruningPlan
from ..surgery import apply_plan
from .derive import Derivation, DerivedAdapter, derive, first_line, model_output
from .stacks import fixed_prefix

#: The order kinds are checked in (attention, then MLP, then whole layers).
CHECKED: tuple[GroupKind, ...] = (
    "heads",
    "kv_groups",
    "neurons",
    "experts",
    "attention_branches",
    "mlp_branches",
    "layers",
)
TOLERANCE = 1e-5
#: Config class → the adapter being verified, while its loader-format folder is reloaded (`load_pruned` asks).
_IN_PROGRESS: dict[type, DerivedAdapter] = {}


def random_plan(
    model: nn.Module, adapter: DerivedAdapter, kind: GroupKind, seed: int = 0, removed_layer: int | None = None
):
    """A seeded plan that removes some groups of `kind` only (for `heads` and `kv_groups` other heads in each layer,
    so that per-head state shared across layers shows, except where the adapter ties heads across layers
    (`tied_heads`): the same heads in every layer then; the same neurons or experts in every layer; for `layers`,
    layer `removed_layer` if given, else a random one)."""

    rng = random.Random(seed)
    plan = PruningPlan.keep_all(model, adapter)
    first = plan.layers[0].geometry
    if kind in ("neurons", "experts"):  # the first mixture-of-experts layer, if any (some models start dense)
        first = next((p.geometry for p in plan.layers if p.geometry.experts), first)
    size = first.intermediate_size
    offset = rng.randrange(64)  # each layer drops other heads (offset + its index): shared per-head state shows
    if kind == "neurons":  # a quarter (in experts: keeping a multiple of EXPERT_WIDTH_MULTIPLE)
        keep = size - max(1, size // 4)
        if first.experts:
            keep = max(EXPERT_WIDTH_MULTIPLE, keep // EXPERT_WIDTH_MULTIPLE * EXPERT_WIDTH_MULTIPLE)
        kept_neurons = tuple(sorted(rng.sample(range(size), keep)))
    elif kind == "experts":  # one routed expert (the same in every layer)
        gone = rng.randrange(first.experts)
        kept_experts = tuple(e for e in range(first.experts) if e != gone)
    for index, layer_plan in enumerate(plan.layers):
        if kind in ("heads", "kv_groups") and layer_plan.geometry.attention is not None:
            kept = _kept_heads(layer_plan.geometry.attention, kind, offset + (0 if adapter.tied_heads else index))
            layer_plan.query_heads, layer_plan.kv_heads = kept
        elif kind == "neurons":
            layer_plan.neurons = kept_neurons
        elif kind == "experts":
            layer_plan.experts = kept_experts
        elif kind == "attention_branches" and index == 0:
            layer_plan.keep_attention = False
        elif kind == "mlp_branches" and index == min(1, len(plan.layers) - 1):
            layer_plan.keep_mlp = False
    if kind == "layers":
        fixed = adapter.fixed_layers(model)
        removable = [i for i in range(len(plan.layers)) if i not in fixed]
        index = rng.choice(removable) if removed_layer is None else removed_layer
        plan.layers[index].keep_layer = False
    return plan


def _kept_heads(attention, kind: GroupKind, choice: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The query and KV heads a layer keeps: for `heads`, all but one query head of every KV group (MHA: one head
    with its KV head), for `kv_groups` all but one KV group; `choice` picks which."""
    g, m = attention.heads_per_group, attention.num_kv_heads
    if kind == "heads" and g > 1:
        drop = {attention.heads_of_group(j)[choice % g] for j in range(m)}
        return tuple(h for h in range(attention.num_heads) if h not in drop), tuple(range(m))
    kept_kv = tuple(j for j in range(m) if j != choice % m)
    return tuple(h for j in kept_kv for h in attention.heads_of_group(j)), kept_kv


def check_kind(
    model: nn.Module, inputs: dict, adapter: DerivedAdapter, kind: GroupKind, removed_layer: int | None = None
) -> str:
    """Cut == masked, and the saved folder reloads to equal outputs; returns the format, raises on failure."""

    plan = random_plan(model, adapter, kind, removed_layer=removed_layer)
    masked, cut = copy.deepcopy(model), copy.deepcopy(model)
    handles = apply_masks(masked, adapter, plan)
    expected = model_output(masked, inputs)
    for handle in handles:
        handle.remove()
    before = sum(p.numel() for p in cut.parameters())
    removed = plan.removed_parameter_count(cut, adapter)
    apply_plan(cut, adapter, plan)
    after = sum(p.numel() for p in cut.parameters())
    if removed <= 0 or after != before - removed:
        raise DerivedAdapterError(f"the cut removed {before - after} parameters, the plan says {removed}")
    difference = (model_output(cut, inputs) - expected).abs().max().item()
    if not difference <= TOLERANCE:
        raise DerivedAdapterError(f"cut and masked outputs differ by {difference:.2e} (> {TOLERANCE})")
    decision = decide_format(cut, adapter)
    if decision.vanilla:
        for key, value in decision.config_fields.items():
            set_config_field(cut.config, key, value)
    if not is_main_process():  # under torchrun transformers writes weights from rank 0 only: it checks the reload
        return "vanilla" if decision.vanilla else f"loader: {decision.reason}"
    with tempfile.TemporaryDirectory() as folder:
        cut.save_pretrained(folder)
        if decision.vanilla:
            reloaded = type(cut).from_pretrained(folder).eval()
        else:  # the loader format: `load_pruned` asks for this adapter, which is not verified (cached) yet
            write_loader_config(Path(folder), cut, adapter)
            _IN_PROGRESS[type(cut.config)] = adapter
            try:
                reloaded = load_pruned(folder).eval()
            finally:
                _IN_PROGRESS.pop(type(cut.config), None)
    difference = (model_output(reloaded, inputs) - expected).abs().max().item()
    name = "vanilla" if decision.vanilla else "loader-format"
    if not difference <= TOLERANCE:
        raise DerivedAdapterError(f"the {name} folder reloads {difference:.2e} away from the masked outputs")
    return "vanilla" if decision.vanilla else f"loader: {decision.reason}"


def verify(config_class) -> Derivation:
    """Derive the adapter for `config_class` and keep only the kinds the tiny instance confirms."""
    start = time.perf_counter()
    try:
        derivation, model, inputs = derive(config_class)
    except Exception as error:  # the tiny model's own forward failed while probing: typed, never raw
        derivation = Derivation(config_class)
        reason = (
            str(error) if isinstance(error, DerivedAdapterError) else f"{type(error).__name__}: {first_line(error)}"
        )
        derivation.refuse(CHECKED, f"derivation failed on a tiny {config_class.__name__} ({reason})")
        derivation.seconds = time.perf_counter() - start
        return derivation
    model_type = getattr(config_class, "model_type", "") or config_class.__name__
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # each vanilla round trip would print save/load bars
    try:
        check_kinds(derivation, model, inputs, model_type)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    derivation.seconds = time.perf_counter() - start
    return derivation


def check_kinds(derivation: Derivation, model: nn.Module, inputs: dict, model_type: str) -> None:
    """Check each kind not refused yet; a failure refuses that kind only."""
    for kind in CHECKED:
        if kind in derivation.refused or kind not in derivation.kinds:  # dense MLPs claim no experts
            continue
        adapter = DerivedAdapter(derivation, model_type)
        if kind in ("kv_groups", "attention_branches") and "heads" in derivation.refused:
            derivation.refuse({kind}, f"needs the head layout, which was refused ({derivation.refused['heads']})")
            continue
        if kind == "kv_groups" and adapter.geometry(adapter.layers(model)[0]).attention.num_kv_heads < 2:
            derivation.refuse({kind}, "one KV head: no KV group can be removed")
            continue
        try:
            if kind == "layers":  # the first layer too: configs that build layers by index (first k dense, ...)
                _check_first_layer(derivation, model, inputs, model_type)
                adapter = DerivedAdapter(derivation, model_type)
            if kind == "heads":
                derivation.formats[kind] = _check_heads(derivation, model, inputs, model_type)
            else:
                derivation.formats[kind] = check_kind(model, inputs, adapter, kind)
        except Exception as error:  # every failure of the cut is a refusal of this kind, never a crash
            where = {"neurons": adapter.mlp_module, "mlp_branches": adapter.mlp_module, "layers": adapter.layers_path}
            where["experts"] = adapter.mlp_module
            where = where.get(kind, adapter.attention_module) or "the block"
            why = f"verification failed in {where} ({type(error).__name__}: {first_line(error)})"
            if kind == "heads":
                why += shared_head_state(model, inputs, adapter)
            derivation.refuse({kind}, why)


@torch.no_grad()
def shared_head_state(model: nn.Module, inputs: dict, adapter: DerivedAdapter) -> str:
    """Why heads may fail, read from the dataflow (a sentence to append to the failure, else ""): a per-head
    parameter only some blocks hold (T5's relative-position bias in the first block, whose bias every block then
    adds), or a tensor with one entry per head (or per batch row and head) that the last block receives from
    outside (a position bias or ALiBi computed once for every layer: BLOOM, MPT). Either is shared by the
    layers, so their heads cannot be chosen apart (a per-layer choice is what pruning makes); `tie_heads` has
    then failed to cut the same heads in every layer."""
    layers = adapter.layers(model)
    geometry = adapter.attention_geometry(layers[0])
    if geometry is None:
        return ""
    n = geometry.num_heads
    for name, holders in _partly_held(adapter, layers):
        return (
            f"; the per-head parameter {name} is in blocks {holders} only and the others read what it gives: "
            "shared by the layers, their heads cannot be chosen apart"
        )
    try:
        received = [f"{key} {tuple(value.shape)}" for key, value in _received_per_head(model, inputs, layers[-1], n)]
    except Exception:  # the explanation is best effort; the refusal stands without it
        return ""
    if not received:
        return ""
    return (
        f"; every block receives {', '.join(received)} with one entry per head ({n}), computed outside the blocks "
        "(a position bias or ALiBi shared by the layers): their heads cannot be chosen apart"
    )


def _partly_held(adapter: DerivedAdapter, layers: nn.ModuleList) -> list[tuple[str, list[int]]]:
    """The per-head parameters (`Derivation.head_parameters`) only some blocks hold, each with those blocks."""
    held = []
    for name, _ in adapter.derivation.head_parameters:
        holders = [i for i, layer in enumerate(layers) if name in dict(layer.named_parameters())]
        if len(holders) < len(layers):
            held.append((name, holders))
    return held


@torch.no_grad()
def _received_per_head(model: nn.Module, inputs: dict, layer: nn.Module, n: int) -> list[tuple[str, torch.Tensor]]:
    """The tensors `layer` receives (beyond its hidden states) with one entry per head (or per batch row and head)
    along one of their first two dimensions, in one forward: (argument, tensor)."""
    batch = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
    received: list[tuple[str, torch.Tensor]] = []

    def record(module, args, kwargs):
        named = [(f"argument {i}", a) for i, a in enumerate(args[1:], 1)] + list(kwargs.items())
        for key, value in named:
            if isinstance(value, torch.Tensor) and value.dim() > 1 and {n, batch * n} & set(value.shape[:2]):
                received.append((key, value.detach().clone()))

    handle = layer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model_output(model, inputs)
    finally:
        handle.remove()
    return received


def _moves_one_head(before: torch.Tensor, after: torch.Tensor, n: int, head: int) -> bool:
    """Whether `after` differs from `before` in entry `head` of its head dimension (the first of its first two of
    size `n`) and nowhere else."""
    axis = next((i for i in (1, 0) if before.shape[i] == n), None)
    if axis is None or before.shape != after.shape:
        return False
    changed = torch.ne(before, after).movedim(axis, 0)
    return bool(changed[head].any()) and not bool(torch.cat([changed[:head], changed[head + 1 :]]).any())


@torch.no_grad()
def shared_head_producers(model: nn.Module, inputs: dict, adapter: DerivedAdapter, n: int):
    """The parameters outside the blocks producing the per-head state every block receives (`_received_per_head`):
    each with exactly one dimension of size `n` whose entry 1, moved by seeded noise, moves entry 1 of the head
    dimension of a received tensor and nothing else (MPNet's `relative_attention_bias` columns, LayoutLMv3's
    `rel_pos_bias`, `rel_pos_x_bias`, `rel_pos_y_bias` rows). Returns (name below the base model, head dimension)
    pairs, `()` where the blocks receive no such state, None where some received tensor no parameter produces
    (ALiBi computed from the head count: BLOOM, MPT)."""
    layers_name = adapter.layers_name(model)
    prefix = layers_name.removesuffix(adapter.layers_path)
    inside = tuple(f"{name}." for name in (layers_name, *adapter._parallel(model)))
    last = adapter.layers(model)[-1]
    base = _received_per_head(model, inputs, last, n)
    found, explained = [], set()
    for name, parameter in model.named_parameters():
        dims = [i for i, size in enumerate(parameter.shape) if size == n]
        if not base or len(dims) != 1 or name.startswith(inside) or not name.startswith(prefix):
            continue
        entry = parameter.narrow(dims[0], 1, 1)
        original = entry.clone()
        try:
            noise = torch.randn(entry.shape, generator=torch.Generator().manual_seed(1), dtype=entry.dtype)
            entry.add_(noise.to(entry.device))
            moved = _received_per_head(model, inputs, last, n)
        finally:
            entry.copy_(original)
        changed = [i for i, ((_, a), (_, b)) in enumerate(zip(base, moved)) if not torch.equal(a, b)]
        one_head = all(_moves_one_head(base[i][1], moved[i][1], n, 1) for i in changed)
        if changed and len(moved) == len(base) and one_head:
            found.append((name[len(prefix) :], dims[0]))
            explained.update(changed)
    return tuple(found) if len(explained) == len(base) else None


def tie_heads(derivation: Derivation, model: nn.Module, inputs: dict, model_type: str) -> str | None:
    """Heads tied across layers, where per-head state is computed once and shared by every block: a per-head
    parameter only the first blocks hold (T5's `relative_attention_bias`, sliced there with its head), or one
    produced outside the blocks (`shared_head_producers`, sliced with the heads every layer keeps). Head `j` of
    every layer is then one group, as channels tied across modules are in Torch-Pruning (Fang et al., "DepGraph:
    Towards Any Structural Pruning", CVPR 2023): cutting the same heads in every layer, and the producers' entries
    of those heads, equals the masked model, and the config's head count holds the cut. `check_kind` decides;
    returns its format, None where nothing is shared or the check fails (ALiBi slopes that change with the head
    count: BLOOM, MPT), with the derivation left as it was."""
    adapter = DerivedAdapter(derivation, model_type)
    layers = adapter.layers(model)
    geometry = adapter.attention_geometry(layers[0])
    if geometry is None:
        return None
    try:
        producers = shared_head_producers(model, inputs, adapter, geometry.num_heads)
    except Exception:  # a forward failed while probing: nothing is tied
        return None
    if not _partly_held(adapter, layers) and not producers:
        return None
    derivation.tied_heads, derivation.shared_head_parameters = True, producers or ()
    try:
        return check_kind(model, inputs, DerivedAdapter(derivation, model_type), "heads")
    except Exception:
        derivation.tied_heads, derivation.shared_head_parameters = False, ()
        return None


def _check_first_layer(derivation: Derivation, model: nn.Module, inputs: dict, model_type: str) -> None:
    """Removing the first layer must verify; where it does not and the leading blocks are built unlike the rest
    (`stacks.fixed_prefix`), those are kept whole (`fixed_prefix`) and removing the first other one must verify
    instead. The first failure is raised otherwise."""
    adapter = DerivedAdapter(derivation, model_type)
    try:
        check_kind(model, inputs, adapter, "layers", removed_layer=0)
    except Exception:
        prefix = fixed_prefix(adapter.layers(model))
        if not 0 < prefix < len(adapter.layers(model)) - 1:
            raise
        derivation.fixed_prefix = True
        try:
            check_kind(model, inputs, DerivedAdapter(derivation, model_type), "layers", removed_layer=prefix)
            return
        except Exception:
            derivation.fixed_prefix = False
        raise


def _check_heads(derivation: Derivation, model: nn.Module, inputs: dict, model_type: str) -> str:
    """`check_kind` for heads; where it fails and the attention module has an `embed_dim` it does not update
    yet, once more with `embed_dim` updated too (forwards that reshape their output by it: XGLM, TrOCR); then with
    the heads tied across layers where the blocks share per-head state (`tie_heads`); the first failure is raised
    if those fail too."""
    try:
        return check_kind(model, inputs, DerivedAdapter(derivation, model_type), "heads")
    except Exception as error:
        first = error
    if "embed_dim" not in derivation.width_attributes:
        original = derivation.width_attributes
        derivation.width_attributes = original + ("embed_dim",)
        try:
            return check_kind(model, inputs, DerivedAdapter(derivation, model_type), "heads")
        except Exception:
            derivation.width_attributes = original
    tied = tie_heads(derivation, model, inputs, model_type)
    if tied is None:
        raise first
    return tied


@functools.cache
def verified_derivation(config_class: type[PretrainedConfig]) -> Derivation:
    """Derive, then verify every claimed kind on the tiny instance; cached per config class."""
    return verify(config_class)


def derived_adapter(config: PretrainedConfig) -> DerivedAdapter:
    """A verified derived adapter for `config`'s class, or a `DerivedAdapterError` saying why none."""
    if type(config) in _IN_PROGRESS:  # verification reloading its own loader-format folder
        return _IN_PROGRESS[type(config)]
    derivation = verified_derivation(type(config))
    if not derivation.kinds:
        by_reason: dict[str, list[str]] = {}
        for kind, why in sorted(derivation.refused.items()):
            by_reason.setdefault(why, []).append(kind)
        reasons = "; ".join(f"{', '.join(kinds)}: {why}" for why, kinds in by_reason.items())
        raise DerivedAdapterError(
            f"model_type {config.model_type!r} has no hand-written adapter and none could be derived and "
            f"verified ({reasons}). Supported: {', '.join(supported_model_types())}, and the types whose adapter "
            "derivation verifies; add one file in hf_prune/groups/ (see llama.py) to support it."
        )
    return DerivedAdapter(derivation, config.model_type)
