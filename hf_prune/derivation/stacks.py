"""The repeated block list a derived adapter prunes, and the config field that counts it.

A *stack* is a `ModuleList` of blocks of one class whose first block holds at least two projections. Its
*count field* is read from the config class itself, not from names: of the integer fields (of the config
and of every config nested in it: `text_config`, `encoder`, ...) equal to a stack's length, the one that,
lowered by one, builds a model (on the meta device, shapes only) whose stack has one block less and every
other stack as it was. A field that shortens several stacks at once is shared: that stack's layers cannot
be removed alone (the `layers` kind is refused), its heads and neurons still can.

A list whose blocks receive hidden states of different widths is a list of stages, not of residual blocks:
the block lists inside its stages are the stacks (each counted by one entry of a per-stage list, `depths[i]`).
Of several stacks (encoder-decoder, a vision tower beside a language model, the per-block lists inside
blocks, the stages of a hierarchical model), the one pruned is the outermost stack with a count field whose
last block runs last in the forward of the tiny inputs: the decoder of an encoder-decoder, the language model
of a multimodal model (its vision tower does not run on text inputs), the vision encoder of an image classifier,
the last stage of a hierarchical one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DerivedAdapterError
from .fields import entry_field, join, sub_config, sub_configs
from .probes import model_output, projection_widths


@dataclass(frozen=True)
class Stack:
    """The block list derivation prunes: its qualified name in the tiny model, the dotted config field counting
    it (None where that field also counts another stack), and the config (dotted path, "" for the top one)
    whose fields size its blocks."""

    name: str
    count_field: str | None
    config_path: str
    #: why `count_field` is None
    shared: str = ""
    #: the sibling lists the count field shortens with this one, in the order the forward runs their entries
    #: (XLM's `attentions`, `layer_norm1`, `ffns`, `layer_norm2`): layer `i` is entry `i` of each
    parallel: tuple[str, ...] = ()


def candidate_stacks(model: nn.Module) -> dict[str, int]:
    """Every `ModuleList` of alike blocks that hold projections: qualified name → length."""
    return {
        name: len(module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) >= 2
        and len({type(block) for block in module}) == 1
        and not isinstance(module[0], (nn.ModuleList, nn.ModuleDict))  # lists of per-stage lists (PVT)
        and len(projection_widths(module[0])) >= 2
    }


def _lengths(model: nn.Module, names) -> dict[str, int | None]:
    lengths = {}
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        lengths[name] = len(module) if isinstance(module, nn.ModuleList) else None
    return lengths


def _lowered_model(model: nn.Module, path: str, key: str, value: int) -> nn.Module | None:
    """`type(model)` built on the meta device from its config with field `key` of the config at `path` lowered by
    one; where the class refuses that, with the config's lists of that length (per-layer lists such as
    Longformer's `attention_window`) shortened by one too. None where it refuses both."""
    for shorten_lists in (False, True):
        lowered = copy.deepcopy(model.config)
        owner = sub_config(lowered, path)
        try:
            setattr(owner, key, value - 1)
            if shorten_lists:
                for name, entry in list(vars(owner).items()):
                    if isinstance(entry, (list, tuple)) and len(entry) == value:
                        setattr(owner, name, type(entry)(entry[:-1]))
            with torch.device("meta"):
                return type(model)(lowered)
        except Exception:  # a consistency check of the class
            continue
    return None


def _lowered_entry(model: nn.Module, path: str, key: str, index: int) -> nn.Module | None:
    """`type(model)` built on the meta device with entry `index` of the list field `key` (of the config at
    `path`) lowered by one (a per-stage depth: Swin's `depths[i]`); None where the class refuses it."""
    lowered = copy.deepcopy(model.config)
    owner = sub_config(lowered, path)
    entries = list(getattr(owner, key))
    entries[index] -= 1
    try:
        setattr(owner, key, type(getattr(owner, key))(entries))
        with torch.device("meta"):
            return type(model)(lowered)
    except Exception:  # a consistency check of the class
        return None


def count_fields(model: nn.Module, stacks: dict[str, int]) -> dict[str, dict[str, int | None]]:
    """Dotted integer field (or list entry, `depths[2]`: hierarchical models count each stage's blocks by one
    entry of a per-stage list) → the stacks whose length it changes when lowered by one (name → new length)."""
    config, found = model.config, {}
    for path, nested in sub_configs(config):
        for key, value in vars(nested).items():
            if isinstance(value, (list, tuple)) and value and all(type(v) is int for v in value):
                candidates = [(f"{key}[{i}]", v, i) for i, v in enumerate(value) if v in stacks.values()]
            elif type(value) is int and value in stacks.values() and not key.endswith("_id"):
                candidates = [(key, value, None)]
            else:
                continue
            for name, count, index in candidates:
                if index is None:
                    smaller = _lowered_model(model, path, key, count)
                else:
                    smaller = _lowered_entry(model, path, key, index)
                if smaller is None:  # the class refuses the lowered value: not a count
                    continue
                # a stack that is gone (inside a removed block) is not shortened
                changed = {
                    n: new for n, new in _lengths(smaller, stacks).items() if new is not None and new != stacks[n]
                }
                if changed:
                    found[join(path, name)] = changed
    return found


def _run_order(model: nn.Module, inputs: dict, names: list[str]) -> dict[str, int]:
    """Stack name → when its last block ran in one forward of `inputs` (absent: it never ran)."""
    order: dict[str, int] = {}
    handles = [
        model.get_submodule(name)[-1].register_forward_hook(
            lambda module, args, output, name=name: order.__setitem__(name, len(order))
        )
        for name in names
    ]
    try:
        model_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _widening(model: nn.Module, inputs: dict, names) -> set[str]:
    """The stacks whose blocks receive hidden states of different widths in one forward: a list of stages
    (SegFormer's `stages`, each of its own width), not of residual blocks; their blocks' lists are pruned."""
    widths: dict[str, set] = {name: set() for name in names}

    def record(name):
        def hook(module, args, kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
            widths[name].add(tensors[0].shape[-1] if tensors else None)

        return hook

    handles = [
        block.register_forward_pre_hook(record(name), with_kwargs=True)
        for name in names
        for block in model.get_submodule(name)
    ]
    try:
        model_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name for name, seen in widths.items() if len(seen) > 1}


def _parallel_lists(model: nn.Module, inputs: dict, name: str, field: str, counted: set[str]) -> tuple[str, ...]:
    """Where `field` shortens only `name` and lists beside it (the same parent, the same length; norms too, which
    hold no projections): every such list, in the order the forward runs entry 0 of each; () otherwise."""
    parent, length = name.rpartition(".")[0], len(model.get_submodule(name))
    if any(other.rpartition(".")[0] != parent for other in counted):
        return ()
    path, _, key = field.rpartition(".")
    key, index = entry_field(key)
    value = getattr(sub_config(model.config, path), key)
    smaller = _lowered_model(model, path, key, value) if index is None else _lowered_entry(model, path, key, index)
    if smaller is None:
        return ()
    siblings = [
        other
        for other, module in model.get_submodule(parent).named_children()
        if isinstance(module, nn.ModuleList) and len(module) == length
    ]
    names = [f"{parent}.{other}" if parent else other for other in siblings]
    shortened = [n for n in names if _lengths(smaller, [n])[n] == length - 1]
    order: dict[str, int] = {}

    def record(n):
        def hook(module, args):  # returns None: the arguments pass unchanged
            order.setdefault(n, len(order))

        return hook

    handles = [model.get_submodule(n)[0].register_forward_pre_hook(record(n)) for n in shortened]
    try:
        model_output(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    ran = sorted((n for n in shortened if n in order), key=order.get)
    return tuple(ran) if name in ran and set(counted) <= set(ran) and len(ran) == len(shortened) else ()


def find_stack(model: nn.Module, inputs: dict) -> Stack:
    """The stack to prune and its count field (module docstring), or a typed refusal saying what was found."""
    stacks = candidate_stacks(model)
    fields = count_fields(model, stacks)
    counted = {name for changed in fields.values() for name, new in changed.items() if new == stacks[name] - 1}
    counted -= _widening(model, inputs, counted)
    outer = [n for n in counted if not any(n.startswith(other + ".") for other in counted)]
    if not outer:
        raise DerivedAdapterError(
            f"{type(model).__name__}: no block list whose length a config field counts (lists of alike blocks: "
            f"{stacks or 'none'}; integer fields that change their lengths: {fields or 'none'})."
        )
    order = _run_order(model, inputs, outer)
    ran = sorted((n for n in outer if n in order), key=order.get)
    name = ran[-1] if ran else outer[-1]
    own = [f for f, changed in fields.items() if changed == {name: stacks[name] - 1}]
    shared = [f for f, changed in fields.items() if changed.get(name) == stacks[name] - 1 and len(changed) > 1]
    field = own[0] if len(own) == 1 else None
    config_path = (field or (own + shared)[0]).rpartition(".")[0]
    if not own and len(shared) == 1:
        parallel = _parallel_lists(model, inputs, name, shared[0], set(fields[shared[0]]))
        if parallel:
            return Stack(name, shared[0], config_path, parallel=parallel)
    reason = "" if field else f"{own or shared} also count(s) {sorted(set(fields[(own + shared)[0]]) - {name})}"
    if len(own) > 1:
        reason = f"several fields count {name} alone ({own})"
    return Stack(name, field, config_path, reason)


def relative_layers_path(model: nn.Module, name: str) -> str:
    """The layer list's name below the base model (`model.layers` → `layers`), so task heads match too."""
    prefix = getattr(model, "base_model_prefix", "")
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def _structure(block: nn.Module) -> tuple:
    """A block's modules, by name and class (no shapes: pruned layers keep their structure)."""
    return tuple((name, type(module).__name__) for name, module in block.named_modules())


def fixed_prefix(blocks: nn.ModuleList) -> int:
    """How many leading blocks are built unlike the others (ModernBERT's first layer has no attention norm, T5's
    first block holds the relative position bias, the dense layers before mixture-of-experts ones): the leading
    run of blocks whose structure is not the most common one. Removing a later block never renumbers them."""
    structures = [_structure(block) for block in blocks]
    common = max(set(structures), key=structures.count)
    count = 0
    while count < len(structures) and structures[count] != common:
        count += 1
    return count


class LayerParts(nn.Module):
    """Layer `index` of a model that keeps each layer's parts in parallel lists (XLM's `attentions[i]`,
    `layer_norm1[i]`, `ffns[i]`, `layer_norm2[i]`: `Stack.parallel`): entry `index` of every list, as a child named
    after its list, so that the attention in one list and the MLP in another are found and cut by names inside
    one layer (`attentions.q_lin`, `ffns.lin1`). It is not run itself: a pre-hook on it goes to its first part
    (the layer's input), a hook to its last (its output), and a part replaced here is replaced in its list."""

    def __init__(self, lists: dict[str, nn.ModuleList], index: int):
        super().__init__()
        self.__dict__["_lists"], self.__dict__["_index"] = lists, index
        for name, entries in lists.items():
            super().__setattr__(name, entries[index])

    def __setattr__(self, name: str, value) -> None:
        if name in self.__dict__.get("_lists", {}):
            self._lists[name][self._index] = value
        super().__setattr__(name, value)

    def parts(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self._lists]

    def register_forward_pre_hook(self, *args, **kwargs):
        return self.parts()[0].register_forward_pre_hook(*args, **kwargs)

    def register_forward_hook(self, *args, **kwargs):
        return self.parts()[-1].register_forward_hook(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise TypeError("LayerParts is not run: the model runs its parts from their lists")


def layer_parts(model: nn.Module, names: list[str]) -> nn.ModuleList:
    """Every layer of the parallel lists `names` (qualified, in the order the forward runs them) as `LayerParts`."""
    lists = {name.rpartition(".")[2]: model.get_submodule(name) for name in names}
    return nn.ModuleList(LayerParts(lists, index) for index in range(len(next(iter(lists.values())))))
