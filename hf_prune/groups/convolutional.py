"""What the convolutional families share: blocks spread over stages, NCHW feature maps, and the
stage channels that the residual additions tie across a stage's blocks.

The layers are every stage's blocks in order (one flat index, as the planner expects); removing
layers rewrites each stage's block list and the config's per-stage `depths`.

Stage channels. Every block of a stage adds its output to the same stream (`hidden_sizes[i]`
channels), so one stream channel is one dependency group that crosses layers: whatever writes the
stream (`StreamMembers.producers`, plus per-channel `scales` and `norms`) loses that output row,
whatever reads it (`consumers`) loses that input column. The groups are named relative to the whole
model (not a layer), so `PruningPlan.stream_channels` holds them per stage, outside `LayerPlan`.
A LayerNorm over the channels (`norms`, ConvNeXt) mixes them through its mean and variance, so the
masked reference recomputes it over the kept channels (`masking.py`), exactly what the cut one does.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from .base import (
    ArchitectureAdapter,
    Branch,
    Group,
    LayerGeometry,
    TensorSlice,
    input_slices,
    output_slices,
)


@dataclass(frozen=True)
class StreamMembers:
    """Qualified module names (from the model root) that touch one stage's stream channels.

    `producers` write them (output rows of a convolution, linear or BatchNorm, bias included),
    `scales` are bare per-channel parameters on the stream (ConvNeXt's layer scale), `norms` are
    LayerNorms over the stream channels, `consumers` read them (input columns).
    """

    producers: tuple[str, ...]
    scales: tuple[str, ...]
    norms: tuple[str, ...]
    consumers: tuple[str, ...]


class StagedAdapter(ArchitectureAdapter):
    """Blocks held as `encoder.stages[i].layers`; no attention, one channel width per block."""

    stages_path: ClassVar[str] = "encoder.stages"
    layers_path = "encoder.stages"
    attention_module = ""
    mlp_module = ""
    o_proj = ""  # no attention branch
    stream_channel_dim = 1
    shapes_per_stage = True
    #: What a stage runs on its input before its first block (relative to the stage), if anything.
    stage_entry: ClassVar[str | None] = None

    def stages(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.stages_name(model))

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return nn.ModuleList(layer for stage in self.stages(model) for layer in stage.layers)

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        kept = {id(layer) for layer in layers}
        for stage in self.stages(model):
            stage.layers = nn.Sequential(*(layer for layer in stage.layers if id(layer) in kept))

    def layer_name(self, model: nn.Module, index: int) -> str:
        stage, block = self._positions(model)[index]
        return f"{self.stages_name(model)}.{stage}.layers.{block}"

    def kept_layer_names(self, model: nn.Module, kept: list[int]) -> list[str]:
        """Blocks are renumbered within their stage; the stages stay."""
        positions, stages_name = self._positions(model), self.stages_name(model)
        names, kept_in_stage = [], [0] * len(self.stages(model))
        for index in kept:
            stage = positions[index][0]
            names.append(f"{stages_name}.{stage}.layers.{kept_in_stage[stage]}")
            kept_in_stage[stage] += 1
        return names

    def layer_entries(self, model: nn.Module) -> dict[int, tuple[str, ...]]:
        """Each stage's `stage_entry` (when it holds anything), before the stage's first block; a
        stage without blocks passes its entry on to the next block."""
        if self.stage_entry is None:
            return {}
        entries, pending, index = {}, [], 0
        stages_name = self.stages_name(model)
        for stage, module in enumerate(self.stages(model)):
            entry = module.get_submodule(self.stage_entry)
            if not isinstance(entry, nn.ModuleList) or len(entry):
                pending.append(f"{stages_name}.{stage}.{self.stage_entry}")
            if len(module.layers) and pending:
                entries[index], pending = tuple(pending), []
            index += len(module.layers)
        return entries

    def _positions(self, model: nn.Module) -> list[tuple[int, int]]:
        """(stage, block within the stage) of every layer, in layer order."""
        stages = self.stages(model)
        return [(stage, block) for stage, module in enumerate(stages) for block in range(len(module.layers))]

    def stages_name(self, model: nn.Module) -> str:
        """Qualified name of the stage list (base and task models alike)."""
        for name, _ in model.named_modules():
            if name == self.stages_path or name.endswith("." + self.stages_path):
                return name
        raise LookupError(f"{type(model).__name__} has no stage list named '{self.stages_path}'")

    # ----------------------------------------------------------------- stage channels
    @abstractmethod
    def stream_members(self, model: nn.Module, stage: int) -> StreamMembers:
        """The modules that write and read stage `stage`'s stream (see the module docstring)."""

    def stream_width(self, model: nn.Module, stage: int) -> int:
        """Present width of stage `stage`'s stream: the output rows of its first producer."""
        producer = model.get_submodule(self.stream_members(model, stage).producers[0])
        return producer.weight.shape[0]

    def stage_channel_slices(
        self, model: nn.Module, stage: int, channel: int, members: StreamMembers | None = None
    ) -> list[TensorSlice]:
        """Every slice of stream channel `channel` of stage `stage`, named from the model root
        (`members`: the stage's `stream_members`, when the caller already has them)."""
        members = members or self.stream_members(model, stage)
        end = channel + 1
        slices = [
            piece for name in members.producers + members.norms for piece in output_slices(model, name, channel, end)
        ]
        slices += [TensorSlice(name, 0, channel, end) for name in members.scales]
        return slices + [piece for name in members.consumers for piece in input_slices(model, name, channel, end)]

    def stage_groups(self, model: nn.Module, stage: int) -> list[Group]:
        """One `stage_channels` group per stream channel of stage `stage` (`Group.layer` holds the stage)."""
        members = self.stream_members(model, stage)
        return [
            Group("stage_channels", stage, channel, tuple(self.stage_channel_slices(model, stage, channel, members)))
            for channel in range(self.stream_width(model, stage))
        ]

    def stream_config_fields(self, model: nn.Module) -> dict:
        """The config fields that say the stream widths (`hidden_sizes`) of the model as it is now."""
        return {"hidden_sizes": [self.stream_width(model, stage) for stage in range(len(self.stages(model)))]}

    def base_prefix(self, model: nn.Module) -> str:
        """`"resnet."`, `"convnext."` on task models, `""` on the base model: where the stage list's owner sits."""
        return self.stages_name(model).removesuffix(self.stages_path)

    def has_branch(self, layer: nn.Module, branch: Branch) -> bool:
        return branch == "mlp"

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # Stage widths and depths already sit in the config; `decide_format` compares shapes.
        return {}

    def update_config_for_layers(self, config: PretrainedConfig, kept_layers: list[int]) -> None:
        starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        config.depths = [
            sum(1 for i in kept_layers if start <= i < start + depth) for start, depth in zip(starts, config.depths)
        ]


def classifier_names(model: nn.Module) -> tuple[str, ...]:
    """The linear layers of a task model's `classifier` (they read the last stage's pooled channels)."""
    return tuple(
        name
        for name, module in model.named_modules()
        if name.split(".")[0] == "classifier" and isinstance(module, nn.Linear)
    )
