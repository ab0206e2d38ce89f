"""`TracedPruner`: channel pruning of any `nn.Module` from its traced dependency groups.

`HFPruner.from_model` returns one for models without an architecture adapter. The cut follows
the engine's semantics: a removed group's consumer columns zeroed is the *masked* model, and the
physical cut (`surgery.slice_tensors`) must reproduce it on the example input, or nothing changes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from ..config import PruningConfig
from ..errors import InvalidPruningTargetError, NotPrunedError, TracingError
from ..evaluation import parameter_count
from ..finite import check_finite_weights
from ..groups import Group, TensorSlice
from ..kinds import count_of
from ..output.atomic import write_atomically
from ..surgery import slice_tensors
from .checkpoint import FORMAT, FORMAT_VERSION, SHAPES_FILE, WEIGHTS_FILE
from .graph import split_inputs, trace_channels
from .groups import TracedGroups, derive_groups
from .scoring import TRACED_CRITERIA, input_norms, score_groups

logger = logging.getLogger(__name__)


@dataclass
class TracedPruningReport:
    """What a traced prune removed, and how closely the cut model matches the masked one."""

    criterion: str
    channels_before: int
    channels_after: int
    parameters_before: int
    parameters_after: int
    #: family name → (groups before, groups removed)
    families: dict[str, tuple[int, int]] = field(default_factory=dict)
    blocked_channels: int = 0
    #: largest |cut − masked| over the example input's outputs
    max_abs_difference: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        removed = 1 - self.parameters_after / self.parameters_before
        return (
            f"traced prune ({self.criterion}): prunable channels {self.channels_before:,} → {self.channels_after:,}, "
            f"parameters {self.parameters_before:,} → {self.parameters_after:,} (−{100 * removed:.1f}%), "
            f"{self.blocked_channels:,} channels left alone; cut vs masked max |Δ| = {self.max_abs_difference:.2e}"
        )


def output_tensors(output) -> list[torch.Tensor]:
    """Every tensor in a model output (a tensor, a tuple, a dict or a `ModelOutput`)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [t for value in output.values() for t in output_tensors(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in output_tensors(value)]
    return []


@torch.no_grad()
def mask_groups(model: nn.Module, groups: Iterable[Group]) -> None:
    """The reference semantics: zero the consumer columns of every removed group (in place)."""
    for group in groups:
        for piece in group.slices:
            if piece.consumer:
                model.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()


class TracedPruner:
    """Prune output channels of a model nobody wrote an adapter for.

    ```python
    pruner = HFPruner.from_model(model, example_inputs=torch.randn(1, 3, 32, 32))
    print(pruner.traced)  # the families of groups, and what was left alone and why
    pruner.prune(PruningConfig(channels=0.3, criterion="magnitude"))
    pruner.save_pretrained("pruned")  # later: hf_prune.load_pruned("pruned", model=build_model())
    ```
    `pruner.model` is the pruned model (the cut runs on a copy and replaces it once verified).
    """

    def __init__(self, model: nn.Module, example_inputs):
        self.model = model.eval()
        self.example_inputs = example_inputs
        self.traced: TracedGroups = derive_groups(trace_channels(self.model, example_inputs), self.model)
        self.removed: list[Group] = []
        self.report: TracedPruningReport | None = None

    def prune(self, config: PruningConfig | None = None, **kwargs) -> TracedPruningReport:
        """Score every group, remove the lowest `config.channels` of each family, verify, cut.

        Data-aware criteria read `config.calibration`: an iterable of model inputs (tensors, tuples
        or dicts), e.g. a few batches of images.
        """
        if config is not None and kwargs:
            raise TypeError("pass either a PruningConfig or keyword arguments, not both")
        config = config or PruningConfig(**kwargs)
        self._check(config)
        check_finite_weights(self.model.named_parameters())
        criterion = config.criterion_for("channels")
        norms = None
        if TRACED_CRITERIA[criterion]:
            consumers = {p.parameter.rpartition(".")[0] for g in self.traced.groups for p in g.slices if p.consumer}
            norms = input_norms(self.model, consumers, config.calibration)
        removed: list[Group] = []
        families: dict[str, tuple[int, int]] = {}
        for family in self.traced.families:
            count = min(count_of(config.channels, len(family.groups)), len(family.groups) - 1)
            scores = score_groups(criterion, self.model, family.groups, config.seed, norms)
            lowest = torch.argsort(scores, stable=True)[:count].tolist()
            removed += [family.groups[i] for i in sorted(lowest)]
            families[family.name] = (len(family.groups), count)
        removed_ids = {(g.layer, g.index) for g in removed}
        kept_channels = sum(
            size
            for family in self.traced.families
            for group, size in zip(family.groups, family.sizes)
            if (group.layer, group.index) not in removed_ids
        )
        before = parameter_count(self.model)
        pruned, difference = self._cut(removed)
        if config.reconstruct != "none":
            logger.info(
                "reconstruct=%r does not apply to traced groups; no repair was run.",
                config.reconstruct,
            )
        self.model, self.removed = pruned, removed
        self.report = TracedPruningReport(
            criterion, self.traced.prunable_channels, kept_channels, before, parameter_count(pruned), families,
            self.traced.blocked_channels, difference,
        )  # fmt: skip
        return self.report

    def _check(self, config: PruningConfig) -> None:
        others = [name for name in PruningConfig.AMOUNTS if name != "channels" and getattr(config, name)]
        if others:
            raise InvalidPruningTargetError(
                f"{', '.join(others)}: a traced model has channel groups only; use channels=... (e.g. channels=0.3)."
            )
        if not config.channels:
            raise InvalidPruningTargetError(
                "nothing to remove: set channels (a fraction, e.g. channels=0.3, or a count)."
            )
        unsupported = {
            "allocation": config.allocation != "uniform",
            "protected_layers": bool(config.protected_layers),
            "round_to": config.round_to != 1,
            config.budget_target or "sparsity": config.budget_target is not None,
        }
        refused = [name for name, given in unsupported.items() if given]
        if refused:
            raise InvalidPruningTargetError(
                f"{', '.join(refused)}: traced models remove the same share of every channel family (uniform "
                "allocation, channels=...); drop these settings."
            )
        if self.report is not None:
            raise InvalidPruningTargetError(
                "this model was already pruned; trace the pruned model again to prune more."
            )
        if not self.traced.families:
            raise TracingError(f"tracing found no prunable channel group.\n{self.traced}")
        criterion = config.criterion_for("channels")
        if criterion not in TRACED_CRITERIA:
            raise InvalidPruningTargetError(
                f"criterion={criterion!r} cannot rank traced channel groups; use one of {', '.join(TRACED_CRITERIA)} "
                "(e.g. criterion='magnitude')."
            )
        if TRACED_CRITERIA[criterion] and isinstance(config.calibration, (str, os.PathLike)):
            raise InvalidPruningTargetError(
                f"criterion={criterion!r} needs calibration inputs for this model: pass calibration=[batch, ...] "
                "(tensors, tuples or dicts the model accepts), not a dataset name."
            )

    @torch.no_grad()
    def _cut(self, removed: list[Group]) -> tuple[nn.Module, float]:
        """The cut model, checked against the masked model on the example input."""
        args, kwargs = split_inputs(self.example_inputs)
        masked = copy.deepcopy(self.model)
        mask_groups(masked, removed)
        expected = output_tensors(masked(*args, **kwargs))
        del masked
        pruned = copy.deepcopy(self.model)
        slice_tensors(pruned, [piece for group in removed for piece in group.slices])
        try:
            actual = output_tensors(pruned(*args, **kwargs))
        except RuntimeError as error:
            raise TracingError(
                f"the cut model fails to run ({error}); its forward uses sizes fixed in code that the prune changed. "
                "Nothing was changed."
            ) from error
        shapes_match = len(actual) == len(expected) and all(a.shape == e.shape for a, e in zip(actual, expected))
        difference = (
            max(
                ((a - e).abs().max().item() for a, e in zip(actual, expected)),
                default=0.0,
            )
            if shapes_match
            else float("inf")
        )
        scale = max((e.abs().max().item() for e in expected), default=1.0)
        if not difference <= 1e-4 * max(scale, 1.0):
            raise TracingError(
                f"the cut model differs from the masked model by {difference:.3g} on the example input; its forward "
                "uses sizes or constants the trace did not tie to the channels. Nothing was changed."
            )
        return pruned, difference

    def removed_slices(self) -> list[TensorSlice]:
        return [piece for group in self.removed for piece in group.slices]

    def save_pretrained(self, save_directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `model.safetensors` and `pruned_shapes.json` (the removed indices of every tensor and
        the resulting shapes), atomically; `hf_prune.load_pruned(folder, model=unpruned)` reads them."""
        if self.report is None:
            raise NotPrunedError("call prune() before save_pretrained(); nothing has been pruned yet.")
        removed: dict[tuple[str, int], set[int]] = {}
        for piece in self.removed_slices():
            removed.setdefault((piece.parameter, piece.dim), set()).update(range(piece.start, piece.stop))
        shapes = {name: list(t.shape) for name, t in [*self.model.named_parameters(), *self.model.named_buffers()]}
        description = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
            "removed": [
                {"tensor": name, "dim": dim, "indices": sorted(indices)}
                for (name, dim), indices in sorted(removed.items())
            ],
            "shapes": shapes,
            "report": self.report.to_dict(),
        }

        def write(folder: Path) -> None:
            save_model(self.model, str(folder / WEIGHTS_FILE))
            (folder / SHAPES_FILE).write_text(json.dumps(description, indent=1))

        return write_atomically(save_directory, write, overwrite=overwrite)
