"""Layer-by-layer pruning in memory on the activations the pruned model computes.

The one-pass prune measures every layer on the dense model's activations, so each layer is
scored and repaired as if the layers before it were intact. With `propagate="pruned"` the layers
are handled in order instead (SparseGPT's sequential calibration): layer `l` is measured on what
the already pruned and repaired layers `0..l−1` compute, then scored, planned, repaired and
masked, and its outputs become the inputs of layer `l+1`. Later layers thereby see, and their
least-squares refit absorbs, the error of the earlier ones. It costs about one more forward pass
than the one-pass prune (each layer runs once to measure, once to propagate); removing layers or
branches adds a whole-model pass that ranks them first. Only `uniform` allocation fits the
layer-at-a-time order (the others rank every layer's groups together).

`propagate="both"` carries the dense model's activations alongside, and refits each changed
layer's MLP (in pre-norm families, where it writes the stream directly) so that the pruned stream
after the layer comes as close as least squares allows to the dense stream at the same point:
the refit then corrects the drift of all earlier layers, not only this layer's own loss, and it
absorbs what removed layers added (the dense stream target runs through them). One more forward
pass of the dense stream, and one more of the pruned stream in each refitted layer. With
`refine_epochs`, each changed layer is then fitted to the dense stream by gradient steps on all
its kept weights (`block_refinement`).

The loop itself is `hf_prune.engine.core.prune_layers`, shared with the low-memory prune; this
module runs it on the model in memory (`LayerSource`: every weight present, layers masked as they
are pruned, cut at the end by `HFPruner.apply`).

Method notes and sources: docs/methods.md §4.6.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..allocation import RemovalCounts
from ..config import PruningConfig
from ..criteria import Criterion
from ..groups import ArchitectureAdapter
from ..plan import PruningPlan
from .core import LayerSource, layer_batches, prune_by_layer


@torch.no_grad()
def prune_layer_by_layer(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    config: PruningConfig,
    criteria: Mapping[str, Criterion],
    targets: RemovalCounts,
    windows: torch.Tensor,
    toward_dense: bool = False,
) -> PruningPlan:
    """Plan, repair and mask `model` in place one layer at a time; returns the plan to cut."""
    stream = "both" if toward_dense else "pruned"
    return prune_by_layer(
        LayerSource(model, adapter), config, criteria, targets, layer_batches(windows, config), stream
    )
