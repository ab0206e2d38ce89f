"""What the convolutional families share: blocks spread over stages, NCHW feature maps.

The layers are every stage's blocks in order (one flat index, as the planner expects); removing
layers rewrites each stage's block list and the config's per-stage `depths`.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PretrainedConfig

from .base import ArchitectureAdapter, Branch, LayerGeometry


class StagedAdapter(ArchitectureAdapter):
    """Blocks held as `encoder.stages[i].layers`; no attention, one channel width per block."""

    stages_path: ClassVar[str] = "encoder.stages"
    layers_path = "encoder.stages"
    attention_module = ""
    mlp_module = ""
    o_proj = ""  # no attention branch
    stream_channel_dim = 1
    shapes_per_stage = True

    def stages(self, model: nn.Module) -> nn.ModuleList:
        for name, module in model.named_modules():
            if name == self.stages_path or name.endswith("." + self.stages_path):
                return module
        raise LookupError(
            f"{type(model).__name__} has no stage list named '{self.stages_path}'"
        )

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return nn.ModuleList(
            layer for stage in self.stages(model) for layer in stage.layers
        )

    def set_layers(self, model: nn.Module, layers: nn.ModuleList) -> None:
        kept = {id(layer) for layer in layers}
        for stage in self.stages(model):
            stage.layers = nn.Sequential(
                *(layer for layer in stage.layers if id(layer) in kept)
            )

    def has_branch(self, layer: nn.Module, branch: Branch) -> bool:
        return branch == "mlp"

    def config_fields(self, config: PretrainedConfig, geometry: LayerGeometry) -> dict:
        # Stage widths and depths already sit in the config; `decide_format` compares shapes.
        return {}

    def update_config_for_layers(
        self, config: PretrainedConfig, kept_layers: list[int]
    ) -> None:
        starts = [sum(config.depths[:stage]) for stage in range(len(config.depths))]
        config.depths = [
            sum(1 for i in kept_layers if start <= i < start + depth)
            for start, depth in zip(starts, config.depths)
        ]
