"""The repeated block list a derived adapter prunes, and the config field that counts it."""

from __future__ import annotations

from torch import nn

from ..errors import DerivedAdapterError
from .probes import projection_widths


def find_layers(model: nn.Module, count: int) -> str:
    """Qualified name of the one `ModuleList` of `count` alike blocks that hold projections."""
    found = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and len({type(block) for block in module}) == 1
        and len(projection_widths(module[0])) >= 2
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
