"""ConvNeXt: each block is a depthwise 7×7 convolution, a LayerNorm and a 4× MLP (`pwconv1` /
`pwconv2`, linear layers on channels-last maps) scaled per channel and added to the block's input.

Prunable:
- the MLP neurons (rows of `pwconv1`, columns of `pwconv2`; the config fixes the 4× ratio, so
  pruned neurons use the loader format);
- whole blocks (the residual keeps the input; the config's `depths` express it, so removed blocks
  stay vanilla);
- `stage_channels`: the channels of a stage's stream, tied across its blocks by the residual
  additions. Written by the stem (stage 0) or the stage's downsampling convolution, by every
  block's depthwise convolution (channel by channel), `pwconv2` and layer scale; normalised by every
  block's LayerNorm, the next stage's downsampling LayerNorm or the final LayerNorm; read by every
  `pwconv1` and the next stage's downsampling convolution or the classifier. The LayerNorms mix
  channels through their statistics, so masking recomputes them over the kept channels.

A stage's downsampling layer (LayerNorm, strided convolution) runs outside its blocks, before the
first: layer-by-layer passes run it there (`stage_entry`, `ArchitectureAdapter.layer_entries`).
"""

from torch import nn

from .base import GroupKind
from .convolutional import StagedAdapter, StreamMembers, classifier_names
from .registry import register_adapter


@register_adapter
class ConvNextAdapter(StagedAdapter):
    model_types = ("convnext",)
    kinds: frozenset[GroupKind] = frozenset(("neurons", "layers", "stage_channels"))
    up_proj = "pwconv1"
    down_proj = "pwconv2"
    stage_entry = "downsampling_layer"

    def stream_members(self, model: nn.Module, stage: int) -> StreamMembers:
        stages_name, stages = self.stages_name(model), self.stages(model)
        prefix = self.base_prefix(model)
        producers, scales, norms, consumers = [], [], [], []
        if len(stages[stage].downsampling_layer):
            producers.append(f"{stages_name}.{stage}.downsampling_layer.1")
        elif stage == 0:
            producers.append(f"{prefix}embeddings.patch_embeddings")
            norms.append(f"{prefix}embeddings.layernorm")
        else:
            raise LookupError(
                f"stage {stage} of {type(model).__name__} has no downsampling layer: its stream is not its own"
            )
        for index, block in enumerate(stages[stage].layers):
            name = f"{stages_name}.{stage}.layers.{index}"
            producers += [f"{name}.dwconv", f"{name}.pwconv2"]
            if block.layer_scale_parameter is not None:
                scales.append(f"{name}.layer_scale_parameter")
            norms.append(f"{name}.layernorm")
            consumers.append(f"{name}.pwconv1")
        if stage + 1 < len(stages):
            if not len(stages[stage + 1].downsampling_layer):
                raise LookupError(f"stage {stage + 1} of {type(model).__name__} has no downsampling layer")
            following = f"{stages_name}.{stage + 1}.downsampling_layer"
            norms.append(f"{following}.0")
            consumers.append(f"{following}.1")
        else:
            norms.append(f"{prefix}layernorm")
            consumers += classifier_names(model)
        return StreamMembers(tuple(producers), tuple(scales), tuple(norms), tuple(consumers))
