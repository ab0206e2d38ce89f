"""From traced channels to dependency groups: what is cut together, in families of like groups.

A group is one set of tied channels (a conv filter with its BatchNorm entry and the input columns
that read it; an attention head with its q/k/v rows and output columns; a residual channel with
every layer that writes or reads it). A *family* holds the groups that slice the same tensors
(the 64 filters of one convolution, the heads of one attention block): uniform allocation removes
the same fraction from every family, and never a whole family.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from torch import nn

from ..groups import Group, TensorSlice
from .graph import VIRTUAL_PREFIX, ChannelGraph


@dataclass(frozen=True)
class Family:
    """Groups that slice the same tensors; `name` lists the modules producing their channels."""

    name: str
    groups: tuple[Group, ...]
    #: output channels (of linear or convolution layers) each group holds
    sizes: tuple[int, ...]

    @property
    def channels(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class BlockedChannels:
    """Channels left alone, and why (the first op found that forbids cutting them)."""

    reason: str
    channels: int
    modules: tuple[str, ...]


@dataclass(frozen=True)
class TracedGroups:
    families: tuple[Family, ...]
    blocked: tuple[BlockedChannels, ...]

    @property
    def groups(self) -> list[Group]:
        return [group for family in self.families for group in family.groups]

    @property
    def prunable_channels(self) -> int:
        return sum(family.channels for family in self.families)

    @property
    def blocked_channels(self) -> int:
        return sum(blocked.channels for blocked in self.blocked)

    def __str__(self) -> str:
        summary = (
            f"Traced dependency groups: {len(self.families)} families, {len(self.groups)} groups, "
            f"{self.prunable_channels:,} prunable output channels; {self.blocked_channels:,} channels left alone."
        )
        lines = [
            summary,
            f"{'family (producing modules)':<60}{'groups':>8}{'channels':>10}",
        ]
        lines += [f"{_short(f.name, 58):<60}{len(f.groups):>8}{f.channels:>10}" for f in self.families]
        if self.blocked:
            lines += ["", f"{'left alone because':<80}{'channels':>10}"]
            lines += [f"{_short(b.reason, 78):<80}{b.channels:>10}" for b in self.blocked]
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def merge_slices(pieces: list[TensorSlice]) -> tuple[TensorSlice, ...]:
    """Adjacent one-channel slices of the same tensor, axis and role as ranges, in a stable order."""
    ordered = sorted(set(pieces), key=lambda p: (p.parameter, p.dim, p.consumer, p.start))
    merged: list[TensorSlice] = []
    for piece in ordered:
        last = merged[-1] if merged else None
        if (
            last
            and (last.parameter, last.dim, last.consumer) == (piece.parameter, piece.dim, piece.consumer)
            and (last.stop >= piece.start)
        ):
            merged[-1] = TensorSlice(
                last.parameter,
                last.dim,
                last.start,
                max(last.stop, piece.stop),
                last.consumer,
            )
        else:
            merged.append(piece)
    return tuple(merged)


def derive_groups(graph: ChannelGraph, model: nn.Module) -> TracedGroups:
    """Families of prunable groups and the blocked channels, in the order the forward pass meets them."""
    buffers = {name for name, _ in model.named_buffers()}
    families: dict[tuple, list[tuple[list[int], tuple[TensorSlice, ...]]]] = defaultdict(list)
    blocked: dict[str, list[int]] = defaultdict(list)
    for _root, members in sorted(graph.components().items()):
        reasons = [graph.blocked[c] for c in members if c in graph.blocked]
        if reasons:
            blocked[reasons[0]].extend(members)
            continue
        pieces = merge_slices([piece for channel in members for piece in graph.slices[channel]])
        signature = tuple(sorted({(p.parameter, p.dim, p.consumer, p.parameter in buffers) for p in pieces}))
        families[signature].append((members, pieces))
    result = []
    for number, entries in enumerate(families.values()):
        producers = sorted({graph.producers[c][0] for members, _ in entries for c in members})
        groups = tuple(Group("channels", number, index, pieces) for index, (_, pieces) in enumerate(entries))
        result.append(
            Family(
                ", ".join(producers),
                groups,
                tuple(len(members) for members, _ in entries),
            )
        )
    report = tuple(
        BlockedChannels(reason, len(real), tuple(sorted({graph.producers[c][0] for c in real})))
        for reason, members in blocked.items()
        if (real := [c for c in members if not graph.producers[c][0].startswith(VIRTUAL_PREFIX)])
    )
    return TracedGroups(tuple(result), report)
