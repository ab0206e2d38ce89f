"""`hf-prune inspect`: a model's dependency groups, what they weigh, and which output format each kind
of pruning would give. Works on a shape-only (meta device) model: no weights are read, nothing is pruned.
Models without an adapter are traced instead (`inspect_traced`): one forward pass on an example input.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby

from torch import nn

from .allocation import plan_for
from .config import PruningConfig
from .criteria.random import RandomCriterion
from .errors import InvalidPruningTargetError
from .evaluation import parameter_count
from .groups import ArchitectureAdapter, GroupKind, LayerGeometry, get_adapter
from .kinds import AMOUNT_OF_KIND, GROUP_KINDS
from .output.checkpoint import decide_format, meta_copy
from .plan import removed_numel
from .surgery import apply_plan
from .tracing.groups import TracedGroups

#: Group kind → how the table names it (the config field that removes it: `hf_prune.kinds.AMOUNT_OF_KIND`).
LABELS: dict[GroupKind, str] = {
    "heads": "attention heads",
    "kv_groups": "KV groups",
    "neurons": "MLP neurons",
    "experts": "routed experts",
    "attention_branches": "attention branches",
    "mlp_branches": "MLP branches",
    "layers": "layers",
    "channels": "inner channels",
    "stage_channels": "stage channels",
}


@dataclass(frozen=True)
class KindSummary:
    kind: GroupKind
    groups: int
    parameters: int
    #: what removing one group of this kind (per layer for heads and neurons) gives
    output_format: str


@dataclass(frozen=True)
class Inspection:
    name: str
    model_type: str
    architecture: str
    parameters: int
    layers: list[LayerGeometry]
    kinds: list[KindSummary]
    #: None for a hand-written adapter; for a derived one, kind → why verification refused it
    refused: dict[str, str] | None = None

    def __str__(self) -> str:
        kinds = ", ".join(LABELS[kind.kind] for kind in self.kinds)
        if self.refused is None:
            handled = f"handled by: the '{self.model_type}' architecture adapter ({kinds})"
        else:
            handled = (
                "handled by: an adapter derived from the model and verified on a tiny instance of its config "
                f"class ({kinds})"
            )
            handled += "".join(f"\n  refused {kind}: {why}" for kind, why in sorted(self.refused.items()))
        moe = any(geometry.experts is not None for geometry in self.layers)  # MLP neurons: each expert's width
        lines = [
            f"{self.name}: {self.architecture} ({self.model_type}), {len(self.layers)} layers, "
            f"{self.parameters:,} parameters",
            handled,
            "",
            f"{'layers':>9}  {'heads':>5}  {'KV heads':>8}  {'head_dim':>8}  {'MLP neurons':>11}"
            + ("  experts" if moe else ""),
        ]
        position = 0
        for geometry, run in groupby(self.layers):
            count = len(list(run))
            span = f"{position}" if count == 1 else f"{position}-{position + count - 1}"
            position += count
            attention = geometry.attention
            heads = (attention.num_heads, attention.num_kv_heads, attention.head_dim) if attention else ("–",) * 3
            neurons = geometry.intermediate_size if geometry.intermediate_size is not None else "–"
            experts = f"  {geometry.experts if geometry.experts is not None else '–':>7}" if moe else ""
            lines.append(f"{span:>9}  {heads[0]:>5}  {heads[1]:>8}  {heads[2]:>8}  {neurons:>11}{experts}")
        lines += [
            "",
            "Dependency groups. share: the part of all parameters the groups of a kind hold (kinds overlap: a "
            "KV group",
            "holds its query heads, a layer everything in it). format: the checkpoint format that removing one group",
            "of the kind gives (one per layer for heads, KV groups, neurons, experts and channels; one per stage",
            "for stage channels; one in all for branches and layers).",
            f"{'kind':<20}{'groups':>8}{'parameters':>14}{'share':>8}  format",
        ]
        for kind in self.kinds:
            share = f"{100 * kind.parameters / self.parameters:.1f}%"
            lines.append(
                f"{LABELS[kind.kind]:<20}{kind.groups:>8,}{kind.parameters:>14,}{share:>8}  {kind.output_format}"
            )
        return "\n".join(lines)


def _format_of_removing_one(model: nn.Module, adapter: ArchitectureAdapter, kind: GroupKind) -> str:
    config = PruningConfig(**{AMOUNT_OF_KIND[kind]: 1}, criterion="random")
    try:
        plan = plan_for(model, adapter, config, RandomCriterion())
    except InvalidPruningTargetError as error:
        return f"not possible ({error})"
    shadow = meta_copy(model)
    apply_plan(shadow, adapter, plan)
    decision = decide_format(shadow, adapter)
    return decision.name if decision.vanilla else f"loader ({decision.reason})"


def inspect_model(model: nn.Module, name: str = "") -> Inspection:
    """Groups per layer and kind, their parameters, and the output format of removing one of each kind.

    Reads shapes only (a meta-device model is enough); scoring uses the `random` criterion, which
    reads no weights, so the formats are those of any criterion.
    """
    adapter = get_adapter(model.config)
    layers = adapter.layers(model)
    geometries = [adapter.geometry(layer) for layer in layers]
    grouped_query = any(g.attention and g.attention.heads_per_group > 1 for g in geometries)
    kinds = []
    for kind in (kind for kind in GROUP_KINDS if kind in adapter.kinds):
        if kind == "kv_groups" and not grouped_query:
            continue  # multi-head attention: every head is its own KV group, listed as heads
        if kind == "stage_channels":  # groups that cross layers, named from the model root
            groups = [
                group for stage in range(len(adapter.stages(model))) for group in adapter.stage_groups(model, stage)
            ]
            # A stage's entry convolution reads the previous stream: count each parameter once.
            size = removed_numel((model, piece) for group in groups for piece in group.slices)
        else:
            groups = [group for index, layer in enumerate(layers) for group in adapter.groups(layer, index, kind)]
            size = sum(piece.numel(layers[group.layer]) for group in groups for piece in group.slices)
        kinds.append(KindSummary(kind, len(groups), size, _format_of_removing_one(model, adapter, kind)))
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    refused = getattr(adapter, "refused", None)  # only derived adapters say what they refused
    return Inspection(name, model.config.model_type, architecture, parameter_count(model), geometries, kinds, refused)


@dataclass(frozen=True)
class TracedInspection:
    name: str
    model_type: str
    architecture: str
    parameters: int
    traced: TracedGroups
    #: why no adapter (hand-written or derived) handles the model
    refusal: str = ""

    def __str__(self) -> str:
        return "\n".join(
            [
                f"{self.name}: {self.architecture} ({self.model_type}), {self.parameters:,} parameters",
                (
                    f"handled by: tracing (no architecture adapter for model_type {self.model_type!r}); prune it "
                    "with HFPruner.from_model(model, example_inputs=...) and channels=..."
                ),
                *([f"why no adapter: {self.refusal}"] if self.refusal else []),
                "",
                str(self.traced),
            ]
        )


def inspect_traced(model: nn.Module, example_inputs, name: str = "", refusal: str = "") -> TracedInspection:
    """What tracing finds in a model without an adapter: its channel families and what it leaves alone, and why."""
    from .tracing.pruner import TracedPruner

    config = getattr(model, "config", None)
    architecture = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    traced = TracedPruner(model, example_inputs).traced
    model_type = getattr(config, "model_type", "torch.nn.Module")
    return TracedInspection(name, model_type, architecture, parameter_count(model), traced, refusal)
