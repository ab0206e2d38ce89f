"""`PruningConfig`: what to remove, and how to choose it."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields

from .errors import InvalidPruningTargetError

Amount = float | int

_AMOUNT_HELP = "A float is a fraction in [0, 1), an int a count."
ALLOCATIONS = ("uniform",)


@dataclass
class PruningConfig:
    """What `HFPruner.prune` removes. Amounts: a `float` is a fraction, an `int` a count."""

    kv_groups: Amount = field(
        default=0, metadata={"help": f"Whole KV groups removed per layer (GQA/MQA models). {_AMOUNT_HELP}"}
    )
    attention_heads: Amount = field(
        default=0,
        metadata={
            "help": "GQA: query heads removed inside every remaining KV group. MHA: heads removed per layer. "
            + _AMOUNT_HELP
        },
    )
    mlp_neurons: Amount = field(default=0, metadata={"help": f"MLP neurons removed per layer. {_AMOUNT_HELP}"})
    attention_branches: Amount = field(
        default=0, metadata={"help": f"Attention sub-blocks removed (the skip connection stays). {_AMOUNT_HELP}"}
    )
    mlp_branches: Amount = field(
        default=0, metadata={"help": f"MLP sub-blocks removed (the skip connection stays). {_AMOUNT_HELP}"}
    )
    layers: Amount = field(default=0, metadata={"help": f"Whole layers removed. {_AMOUNT_HELP}"})
    criterion: str = field(default="magnitude", metadata={"help": "How groups are scored (see hf_prune.criteria)."})
    allocation: str = field(default="uniform", metadata={"help": f"How removals spread over layers: {ALLOCATIONS}."})
    seed: int = field(default=0, metadata={"help": "Seed for every random choice (the `random` criterion, ties)."})
    require_vanilla: bool = field(
        default=False,
        metadata={"help": "Fail instead of writing the loader format when a plain config cannot express the shapes."},
    )

    AMOUNTS = ("kv_groups", "attention_heads", "mlp_neurons", "attention_branches", "mlp_branches", "layers")

    def __post_init__(self) -> None:
        from .criteria import available_criteria  # the registry imports this module's siblings

        for name in self.AMOUNTS:
            _check_amount(name, getattr(self, name))
        if self.criterion not in available_criteria():
            raise InvalidPruningTargetError(
                f"criterion={self.criterion!r} is unknown; choose one of {', '.join(available_criteria())}."
            )
        if self.allocation not in ALLOCATIONS:
            raise InvalidPruningTargetError(
                f"allocation={self.allocation!r} is unknown; choose one of {', '.join(ALLOCATIONS)}."
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidPruningTargetError(f"seed must be an int, got {self.seed!r}.")

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, name) == 0 for name in self.AMOUNTS)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PruningConfig:
        """The `pruning` section of a YAML recipe, checked (see `hf_prune.recipes`; errors name file and key)."""
        from .recipes import load_recipe  # recipes imports this module

        return load_recipe(path).pruning


def _check_amount(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidPruningTargetError(
            f"{name}={value!r} must be a float fraction in [0, 1) or an int count; booleans are not amounts."
        )
    if isinstance(value, float) and not 0.0 <= value < 1.0:
        hint = f" For a count, pass an int: {name}={int(value)}." if value >= 1 and value == int(value) else ""
        raise InvalidPruningTargetError(f"{name}={value!r} is a fraction and must lie in [0, 1).{hint}")
    if isinstance(value, int) and value < 0:
        raise InvalidPruningTargetError(f"{name}={value!r} is a count and must be >= 0.")


def count_of(value: Amount, total: int) -> int:
    """The number of units an amount removes out of `total` (fractions round half up)."""
    if isinstance(value, float):
        return int(value * total + 0.5)
    return value
