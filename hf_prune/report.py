"""`PruningReport`: what a prune removed, per layer, and which output format it implies."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .plan import LayerPlan, PruningPlan


@dataclass(frozen=True)
class LayerReport:
    layer: int
    removed: bool
    heads: tuple[int, int]  # (before, after)
    kv_heads: tuple[int, int]
    neurons: tuple[int, int]
    removed_branches: tuple[str, ...]
    #: routed experts (before, after); (0, 0) in dense layers
    experts: tuple[int, int] = (0, 0)

    @classmethod
    def from_plan(cls, plan: LayerPlan) -> LayerReport:
        before, after = plan.geometry, plan.pruned_geometry()
        heads_before = before.attention.num_heads if before.attention else 0
        kv_before = before.attention.num_kv_heads if before.attention else 0
        experts_before = before.experts or 0
        if not plan.keep_layer:
            return cls(
                plan.layer,
                True,
                (heads_before, 0),
                (kv_before, 0),
                (before.intermediate_size or 0, 0),
                (),
                (experts_before, 0),
            )
        return cls(
            plan.layer,
            False,
            (heads_before, after.attention.num_heads if after.attention else 0),
            (kv_before, after.attention.num_kv_heads if after.attention else 0),
            (before.intermediate_size or 0, after.intermediate_size or 0),
            tuple(plan.removed_branches()),
            (experts_before, after.experts or 0),
        )

    def describe(self) -> str:
        if self.removed:
            return "layer removed"
        parts = []
        if "attention" in self.removed_branches:
            parts.append("attention branch removed")
        elif self.heads[0] != self.heads[1]:
            kv = f" ({self.kv_heads[0]}→{self.kv_heads[1]} KV)" if self.kv_heads[0] != self.heads[0] else ""
            parts.append(f"heads {self.heads[0]}→{self.heads[1]}{kv}")
        if "mlp" in self.removed_branches:
            parts.append("MLP branch removed")
        else:
            if self.experts[0] != self.experts[1]:
                parts.append(f"experts {self.experts[0]}→{self.experts[1]}")
            if self.neurons[0] != self.neurons[1]:
                parts.append(f"neurons {self.neurons[0]}→{self.neurons[1]}")
        return ", ".join(parts) or "unchanged"


@dataclass(frozen=True)
class PruningReport:
    model_type: str
    parameters_before: int
    parameters_after: int
    output_format: str
    format_reason: str
    config: dict
    layers: tuple[LayerReport, ...] = field(default_factory=tuple)
    #: the calibration that actually ran (source, windows, seq_len, tokens), None for data-free prunes.
    calibration: dict | None = None
    #: stage → stream channels kept, for the stages that lost some (convolutional `stage_channels`).
    stream_channels: dict[int, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        model_type: str,
        plan: PruningPlan,
        before: int,
        after: int,
        fmt: str,
        reason: str,
        config: dict,
        calibration: dict | None = None,
    ):
        layers = tuple(LayerReport.from_plan(p) for p in plan.layers)
        streams = {stage: len(kept) for stage, kept in sorted(plan.stream_channels.items())}
        return cls(model_type, before, after, fmt, reason, config, layers, calibration, streams)

    @property
    def removed_fraction(self) -> float:
        return 1 - self.parameters_after / self.parameters_before

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{'layer':>5}  change", f"{'-' * 5}  {'-' * 40}"]
        lines += [f"{layer.layer:>5}  {layer.describe()}" for layer in self.layers]
        lines += [f"stage {stage} stream: {kept} channels kept" for stage, kept in self.stream_channels.items()]
        lines += [
            "",
            f"parameters: {self.parameters_before:,} → {self.parameters_after:,} "
            f"(-{100 * self.removed_fraction:.1f}%)",
            f"output format: {self.output_format} ({self.format_reason})",
        ]
        return "\n".join(lines)
