"""`PruningConfig`: what to remove, and how to choose it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import ClassVar

from .allocation import available_allocations
from .criteria import available_criteria
from .errors import InvalidPruningTargetError
from .kinds import AMOUNTS, BUDGET_TARGETS, DAMPING, GROUP_KINDS, Amount
from .output.recipe_file import read_recipe

RECONSTRUCTIONS = ("none", "bias", "lstsq", "ispasp")
EXPERT_REPAIRS = ("none", "merge")
PROPAGATIONS = ("unpruned", "pruned", "both")
#: Chosen on WikiText-2 validation windows with SmolLM2-135M (see scripts/benchmark_zero_shot.py):
#: structured OBS with the least-squares refit for channels, block influence for blocks.
DEFAULT_CRITERIA = {
    "heads": "obs",
    "kv_groups": "obs",
    "neurons": "obs",
    "experts": "reap",
    "attention_branches": "block_influence",
    "mlp_branches": "block_influence",
    "layers": "block_influence",
    "channels": "magnitude",
    "stage_channels": "magnitude",
}
_AMOUNT_HELP = "A float is a fraction in [0, 1), an int a count."


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
    experts: Amount = field(
        default=0,
        metadata={
            "help": "Routed experts removed per mixture-of-experts layer (router row and every expert tensor's "
            "slice; shared experts are dense MLPs, never counted). At least num_experts_per_tok must stay. "
            + _AMOUNT_HELP
        },
    )
    attention_branches: Amount = field(
        default=0, metadata={"help": f"Attention sub-blocks removed (the skip connection stays). {_AMOUNT_HELP}"}
    )
    mlp_branches: Amount = field(
        default=0, metadata={"help": f"MLP sub-blocks removed (the skip connection stays). {_AMOUNT_HELP}"}
    )
    layers: Amount = field(default=0, metadata={"help": f"Whole layers removed. {_AMOUNT_HELP}"})
    channels: Amount = field(
        default=0,
        metadata={
            "help": "Fraction or count of prunable output channels of convolution/linear groups (ResNet, ConvNeXt, "
            f"traced models). {_AMOUNT_HELP}"
        },
    )
    stage_channels: Amount = field(
        default=0,
        metadata={
            "help": "Fraction or count of each stage's stream channels removed, the same share in every stage "
            "(ResNet, ConvNeXt: the channels the residual additions tie across a stage's blocks); repaired by "
            f"reconstruct='lstsq' or not at all ('none'). {_AMOUNT_HELP}"
        },
    )
    criterion: str | dict[str, str] = field(
        default_factory=lambda: dict(DEFAULT_CRITERIA),
        metadata={
            "help": "How groups are scored: one criterion name (hf_prune.criteria) for every kind, or a mapping "
            f"from group kind ({', '.join(GROUP_KINDS)}) to a name; kinds left out use the defaults "
            f"({DEFAULT_CRITERIA})."
        },
    )
    sparsity: float = field(
        default=0.0,
        metadata={
            "help": "Fraction in [0, 1) of the prunable (non-embedding) parameters to remove, spread over attention "
            "heads (whole KV groups on GQA models) and MLP neurons. Replaces the per-kind amounts."
        },
    )
    target_params: int = field(
        default=0,
        metadata={"help": "Parameter count the pruned model should have (heads and neurons go; 0: unset)."},
    )
    target_flops: int = field(
        default=0,
        metadata={
            "help": "Forward FLOPs per token, with seq_len tokens of attention context, the pruned model should "
            "need (hf_prune.evaluation.flops_per_token; 0: unset)."
        },
    )
    allocation: str = field(
        default="uniform",
        metadata={
            "help": "How removals spread over layers: 'uniform' (the same count in every layer; a standard config "
            "fits), 'global' (each kind ranked model-wide after per-layer normalisation), 'adaptive' (FLAP-style: "
            "heads and neurons ranked together by standardised score against one parameter budget)."
        },
    )
    protected_layers: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "Layer indices never pruned (negative counts from the end: (0, -1) keeps the first and last)."
        },
    )
    round_to: int = field(
        default=1,
        metadata={
            "help": "Keep a multiple of this many MLP neurons in every layer (8, 64: faster kernels). Attention "
            "widths already move in steps of head_dim."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for every random choice (calibration windows, `random`)."})
    calibration: object = field(
        default="wikitext2",
        metadata={
            "help": "Calibration data: 'wikitext2', a text file, a folder of parquet files, a datasets.Dataset with a "
            "'text' column, or a list of strings or token-id tensors; for image models 'cifar10' (train split) or an "
            "image folder (CLASS/IMAGE), through the model's image processor. Read only by data-aware criteria and "
            "repairs."
        },
    )
    num_samples: int = field(default=128, metadata={"help": "Calibration windows."})
    seq_len: int = field(default=512, metadata={"help": "Tokens per calibration window."})
    batch_size: int = field(default=8, metadata={"help": "Calibration windows per forward pass."})
    reconstruct: str = field(
        default="lstsq",
        metadata={"help": f"Training-free repair of the projections that lose channels: {RECONSTRUCTIONS}."},
    )
    expert_repair: str = field(
        default="none",
        metadata={
            "help": "Training-free repair of removed routed experts: 'none', or 'merge' (each removed expert "
            "averaged, weighted by how often each is routed to, into the kept expert it is most often routed "
            "with; hf_prune.repair.expert_merge)."
        },
    )
    damping: float = field(
        default=DAMPING,
        metadata={
            "help": "Ridge of the least-squares solves of obs, lstsq, ispasp and bias, relative to the mean diagonal "
            "of the Gram matrix. Raise it (e.g. 1e-2) when the calibration set has fewer tokens than the widest "
            "pruned layer has channels."
        },
    )
    propagate: str = field(
        default="unpruned",
        metadata={
            "help": "Which activations each layer is measured on: 'unpruned' (one pass over the dense model), "
            "'pruned' (layer by layer, on what the already pruned layers compute; about one more forward pass; "
            "uniform allocation only) or 'both' (as 'pruned', with the dense activations carried alongside: each "
            "layer's MLP is refitted so the pruned stream after it matches the dense one; one more forward pass)."
        },
    )
    refine_epochs: int = field(
        default=0,
        metadata={
            "help": "With propagate='both': passes of Adam over the calibration batches that fit each changed "
            "layer's kept weights to the dense stream after it (0: none; each pass costs about four forward "
            "passes of the layer: training and an error check)."
        },
    )
    refine_lr: float = field(
        default=1e-3, metadata={"help": "Adam step of refine_epochs, relative to each tensor's RMS."}
    )
    require_vanilla: bool = field(
        default=False,
        metadata={"help": "Fail instead of writing the loader format when a plain config cannot express the shapes."},
    )

    #: The amount fields (`hf_prune.kinds.AMOUNTS`).
    AMOUNTS: ClassVar[tuple[str, ...]] = AMOUNTS

    def __post_init__(self) -> None:
        for name in self.AMOUNTS:
            _check_amount(name, getattr(self, name))
        names = self.criterion.values() if isinstance(self.criterion, dict) else [self.criterion]
        for name in names:
            if name not in available_criteria():
                raise InvalidPruningTargetError(
                    f"criterion={name!r} is unknown; choose one of {', '.join(available_criteria())}."
                )
        if isinstance(self.criterion, dict):
            unknown = sorted(set(self.criterion) - set(GROUP_KINDS) - {"default"})
            if unknown:
                raise InvalidPruningTargetError(
                    f"criterion has unknown group kinds {unknown}; use {', '.join(GROUP_KINDS)} or 'default'."
                )
        if self.reconstruct not in RECONSTRUCTIONS:
            raise InvalidPruningTargetError(
                f"reconstruct={self.reconstruct!r} is unknown; choose one of {', '.join(RECONSTRUCTIONS)}."
            )
        if self.expert_repair not in EXPERT_REPAIRS:
            raise InvalidPruningTargetError(
                f"expert_repair={self.expert_repair!r} is unknown; choose one of {', '.join(EXPERT_REPAIRS)}."
            )
        if self.propagate not in PROPAGATIONS:
            raise InvalidPruningTargetError(
                f"propagate={self.propagate!r} is unknown; choose one of {', '.join(PROPAGATIONS)}."
            )
        self._check_refinement()
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not 0 < self.damping < 1:
            raise InvalidPruningTargetError(
                f"damping={self.damping!r} must be a float in (0, 1): the ridge as a fraction of the Gram diagonal's "
                f"mean, e.g. {DAMPING}."
            )
        for name in ("num_samples", "seq_len", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidPruningTargetError(f"{name}={value!r} must be a positive int.")
        if self.allocation not in available_allocations():
            raise InvalidPruningTargetError(
                f"allocation={self.allocation!r} is unknown; choose one of {', '.join(available_allocations())}."
            )
        self._check_budget_targets()
        self.protected_layers = tuple(self.protected_layers)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.protected_layers):
            raise InvalidPruningTargetError(
                f"protected_layers={self.protected_layers!r} must hold layer indices (ints), e.g. (0, -1)."
            )
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise InvalidPruningTargetError(f"round_to={self.round_to!r} must be a positive int (1: no rounding).")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise InvalidPruningTargetError(f"seed must be an int, got {self.seed!r}.")

    def _check_refinement(self) -> None:
        epochs, learning_rate = self.refine_epochs, self.refine_lr
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
            raise InvalidPruningTargetError(f"refine_epochs={epochs!r} must be a non-negative int (0: no refinement).")
        if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
            raise InvalidPruningTargetError(f"refine_lr={learning_rate!r} must be a positive float, e.g. 1e-3.")
        if epochs and self.propagate != "both":
            raise InvalidPruningTargetError(
                f"refine_epochs={epochs} fits each layer to the dense stream, which only propagate='both' carries; "
                f"set propagate='both' (got {self.propagate!r}) or refine_epochs=0."
            )

    def _check_budget_targets(self) -> None:
        if (
            isinstance(self.sparsity, bool)
            or not isinstance(self.sparsity, (int, float))
            or not 0 <= self.sparsity < 1
        ):
            raise InvalidPruningTargetError(
                f"sparsity={self.sparsity!r} is a fraction of the prunable parameters and must lie in [0, 1)."
            )
        for name in ("target_params", "target_flops"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidPruningTargetError(f"{name}={value!r} must be a non-negative int (0: unset).")
        given = [name for name in BUDGET_TARGETS if getattr(self, name)]
        if len(given) > 1:
            raise InvalidPruningTargetError(f"{' and '.join(given)} are alternatives; set only one of them.")
        amounts = [name for name in self.AMOUNTS if getattr(self, name)]
        if given and amounts:
            raise InvalidPruningTargetError(
                f"{given[0]} sets the whole budget and chooses the heads and neurons itself; drop "
                f"{', '.join(amounts)} or drop {given[0]}."
            )

    @property
    def budget_target(self) -> str | None:
        """The budget target that is set (`sparsity`, `target_params`, `target_flops`), if any."""
        return next((name for name in BUDGET_TARGETS if getattr(self, name)), None)

    def criterion_for(self, kind: str) -> str:
        """The criterion name that ranks groups of `kind`."""
        if isinstance(self.criterion, str):
            return self.criterion
        return self.criterion.get(kind, self.criterion.get("default", DEFAULT_CRITERIA[kind]))

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, name) == 0 for name in self.AMOUNTS + BUDGET_TARGETS)

    def to_dict(self) -> dict:
        """A JSON-friendly copy (an in-memory calibration source is described, not copied)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        if isinstance(self.criterion, dict):
            data["criterion"] = dict(self.criterion)
        data["protected_layers"] = list(self.protected_layers)
        if not isinstance(self.calibration, (str, os.PathLike)):
            data["calibration"] = f"<{type(self.calibration).__name__}>"
        else:
            data["calibration"] = str(self.calibration)
        return data

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> PruningConfig:
        """The `pruning` section of a YAML recipe, checked (see `hf_prune.output.recipes`; errors name the file
        and the key)."""
        return read_recipe(path, cls).pruning


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
