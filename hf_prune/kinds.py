"""The vocabulary every stage shares: group kinds, the config amount that removes each, shared constants.

This module imports nothing from hf_prune, so any module may import it without making an import cycle.

A *group kind* names what one dependency group is (a query head, an MLP neuron, a whole layer, ...);
a `PruningConfig` *amount* field says how many groups of one kind to remove. Two kinds have an amount
with another name: `heads` ↔ `attention_heads` and `neurons` ↔ `mlp_neurons`. A *budget* field
(`sparsity`, `target_params`, `target_flops`) asks for a whole model size instead and lets the
allocation choose the heads and neurons; "target" in hf_prune means only that budget.
"""

from __future__ import annotations

from typing import Literal, get_args

#: A `PruningConfig` amount: a `float` is a fraction of the groups, an `int` a count.
Amount = float | int

__version__ = "0.1.0"

GroupKind = Literal[
    "heads",
    "kv_groups",
    "neurons",
    "experts",
    "attention_branches",
    "mlp_branches",
    "layers",
    "channels",
    "stage_channels",
]
Branch = Literal["attention", "mlp"]

#: Every group kind, in the order configs and tables list them.
GROUP_KINDS: tuple[GroupKind, ...] = get_args(GroupKind)
#: Channels inside one layer: slices of a projection's output rows and its consumer's input columns.
CHANNEL_KINDS: frozenset[GroupKind] = frozenset(("heads", "kv_groups", "neurons", "channels"))
#: Whole sub-blocks or layers, removed with their skip connection kept.
BLOCK_KINDS: frozenset[GroupKind] = frozenset(("attention_branches", "mlp_branches", "layers"))
#: Groups that cross layers (`Group.layer` is a stage; slices are named from the model root).
STAGE_KINDS: frozenset[GroupKind] = frozenset(("stage_channels",))
#: Whole routed experts of a mixture-of-experts MLP (router row and every expert tensor's slice): only
#: adapters that find experts (`hf_prune.groups.experts`) prune them, only criteria that name them rank them.
EXPERT_KINDS: frozenset[GroupKind] = frozenset(("experts",))
#: The kinds that live in the attention branch (the others, but `layers`, in the MLP branch).
ATTENTION_KINDS: frozenset[GroupKind] = frozenset(("heads", "kv_groups", "attention_branches"))
#: What transformer adapters prune; convolutional adapters name their own `kinds`.
TRANSFORMER_KINDS: frozenset[GroupKind] = frozenset(
    ("heads", "kv_groups", "neurons", "attention_branches", "mlp_branches", "layers")
)
#: Group kind → the `PruningConfig` amount field that removes it, in the config's field order.
AMOUNT_OF_KIND: dict[GroupKind, str] = {
    "kv_groups": "kv_groups",
    "heads": "attention_heads",
    "neurons": "mlp_neurons",
    "experts": "experts",
    "attention_branches": "attention_branches",
    "mlp_branches": "mlp_branches",
    "layers": "layers",
    "channels": "channels",
    "stage_channels": "stage_channels",
}
#: The `PruningConfig` amount fields (per-kind counts or fractions).
AMOUNTS: tuple[str, ...] = tuple(AMOUNT_OF_KIND.values())
#: The `PruningConfig` budget fields: mutually exclusive with each other and with the amounts.
BUDGET_TARGETS = ("sparsity", "target_params", "target_flops")


def count_of(value: Amount, total: int) -> int:
    """The number of units an amount removes out of `total` (fractions round half up)."""
    if isinstance(value, float):
        return int(value * total + 0.5)
    return value


#: Ridge of every least-squares solve (OBS, the refits, bias folding), as a fraction of the mean
#: diagonal of the Gram matrix. Chosen on WikiText-2 validation windows with SmolLM2-135M, MLP −25%,
#: obs + lstsq: a refit ridge of 1e-1, 1e-2, 1e-3, 1e-4 gave 1.55, 1.30, 1.25, 1.24 × dense with OBS
#: at 1e-2; both at 1e-4, 1.22 (both at 1e-5: the same). A small ridge shrinks the refit less.
DAMPING = 1e-4
