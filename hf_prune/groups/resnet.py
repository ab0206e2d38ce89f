"""ResNet (`ResNetForImageClassification`, basic and bottleneck blocks).

Prunable: each block's inner `channels`, the output channels of its first convolution with their
BatchNorm (weight, bias and running statistics), read as input channels by the block's second
convolution. Removing one changes nothing outside the block, so it is masked by zeroing the
second convolution's input channel, exactly as an MLP neuron is. The config's fixed widths
(`hidden_sizes`, the bottleneck ratio) cannot express pruned inner widths: such models use the
loader format. The stage channels, tied across blocks by the residual additions and read by the
classifier, and whole blocks (the first block of a stage has a projection shortcut) are not
pruned yet.
"""

from torch import nn

from .base import GroupKind, TensorSlice, input_slices, output_slices
from .convolutional import StagedAdapter
from .registry import register_adapter


@register_adapter
class ResNetAdapter(StagedAdapter):
    model_types = ("resnet",)
    kinds: frozenset[GroupKind] = frozenset(("channels",))
    neuron_kind: GroupKind = "channels"
    up_proj = "layer.0.convolution"
    down_proj = "layer.1.convolution"

    def neuron_slices(
        self, layer: nn.Module, intermediate_size: int, neuron: int
    ) -> list[TensorSlice]:
        """Filter `neuron` of the first convolution, its BatchNorm channel, its input channel of the second."""
        return (
            output_slices(layer, self.up_proj, neuron, neuron + 1)
            + output_slices(layer, "layer.0.normalization", neuron, neuron + 1)
            + input_slices(layer, self.down_proj, neuron, neuron + 1)
        )
