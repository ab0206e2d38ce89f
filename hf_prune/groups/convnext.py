"""ConvNeXt: each block is a depthwise 7×7 convolution, a LayerNorm and a 4× MLP (`pwconv1` /
`pwconv2`, linear layers on channels-last maps) added to the block's input.

Prunable: the MLP neurons (rows of `pwconv1`, columns of `pwconv2`; the config fixes the 4× ratio,
so pruned neurons use the loader format) and whole blocks (the residual keeps the input; the
config's `depths` express it, so removed blocks stay vanilla). The stage channels, tied across a
stage's blocks by the residual additions, are not pruned yet.
"""

from .base import GroupKind
from .convolutional import StagedAdapter
from .registry import register_adapter


@register_adapter
class ConvNextAdapter(StagedAdapter):
    model_types = ("convnext",)
    kinds: frozenset[GroupKind] = frozenset(("neurons", "layers"))
    up_proj = "pwconv1"
    down_proj = "pwconv2"
