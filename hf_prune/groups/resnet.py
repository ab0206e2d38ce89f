"""ResNet (`ResNetForImageClassification`, basic and bottleneck blocks).

Prunable:
- each block's inner `channels`: the output channels of its first convolution with their
  BatchNorm (weight, bias and running statistics), read as input channels by the block's second
  convolution. Removing one changes nothing outside the block, so it is masked by zeroing the
  second convolution's input channel, exactly as an MLP neuron is.
- `stage_channels`: the channels of a stage's stream, tied across its blocks by the residual
  additions. Written by the stage's projection shortcut (or, when the first block's shortcut is the
  identity, by the stem), by every block's last convolution and its BatchNorm; read by every
  block's first convolution, the next stage's shortcut and first convolution, or the classifier.
  Zeroing a removed channel's producer rows and BatchNorm weight and shift makes the stream channel
  identically 0 (the ReLU after each addition keeps it 0), so masking needs no hooks.

The config's fixed widths (`hidden_sizes`, the bottleneck ratio) cannot express pruned inner
widths, and a basic block's inner width is its stage width: pruned stage channels stay vanilla only
when the inner widths follow them (`decide_format` checks on the shapes); otherwise the loader
format. Whole blocks are not pruned (the first block of a stage has a projection shortcut).
"""

from torch import nn

from .base import GroupKind, TensorSlice, input_slices, output_slices
from .convolutional import StagedAdapter, StreamMembers, classifier_names
from .registry import register_adapter


@register_adapter
class ResNetAdapter(StagedAdapter):
    model_types = ("resnet",)
    kinds: frozenset[GroupKind] = frozenset(("channels", "stage_channels"))
    neuron_kind: GroupKind = "channels"
    up_proj = "layer.0.convolution"
    down_proj = "layer.1.convolution"

    def neuron_slices(self, layer: nn.Module, intermediate_size: int, neuron: int) -> list[TensorSlice]:
        """Filter `neuron` of the first convolution, its BatchNorm channel, its input channel of the second."""
        return (
            output_slices(layer, self.up_proj, neuron, neuron + 1)
            + output_slices(layer, "layer.0.normalization", neuron, neuron + 1)
            + input_slices(layer, self.down_proj, neuron, neuron + 1)
        )

    def stream_members(self, model: nn.Module, stage: int) -> StreamMembers:
        stages_name, stages = self.stages_name(model), self.stages(model)
        blocks = stages[stage].layers
        projected = _has_projection(blocks[0])
        if projected:
            entry = (
                f"{stages_name}.{stage}.layers.0.shortcut.convolution",
                f"{stages_name}.{stage}.layers.0.shortcut.normalization",
            )
        elif stage == 0:
            stem = f"{self.base_prefix(model)}embedder.embedder"
            entry = (f"{stem}.convolution", f"{stem}.normalization")
        else:
            raise LookupError(
                f"stage {stage} of {type(model).__name__} has no projection shortcut: its stream is not its own"
            )
        producers = list(entry)
        consumers = []
        for index, block in enumerate(blocks):
            name, last = f"{stages_name}.{stage}.layers.{index}.layer", len(block.layer) - 1
            producers += [f"{name}.{last}.convolution", f"{name}.{last}.normalization"]
            if index > 0 or not projected:
                consumers.append(f"{name}.0.convolution")
        if stage + 1 < len(stages):
            following = f"{stages_name}.{stage + 1}.layers.0"
            if not _has_projection(stages[stage + 1].layers[0]):
                raise LookupError(f"stage {stage + 1} of {type(model).__name__} has no projection shortcut")
            consumers += [f"{following}.shortcut.convolution", f"{following}.layer.0.convolution"]
        else:
            consumers += classifier_names(model)
        return StreamMembers(tuple(producers), (), (), tuple(consumers))

    def stream_config_fields(self, model: nn.Module) -> dict:
        stem = model.get_submodule(f"{self.base_prefix(model)}embedder.embedder.convolution")
        return super().stream_config_fields(model) | {"embedding_size": stem.weight.shape[0]}


def _has_projection(block: nn.Module) -> bool:
    return not isinstance(block.shortcut, nn.Identity)
