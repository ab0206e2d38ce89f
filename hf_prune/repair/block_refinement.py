"""Gradient refinement of a pruned layer toward the dense model's residual stream.

The least-squares refit is the best *linear* repair of one projection. With
`PruningConfig(propagate="both", refine_epochs=N)` every changed layer then takes `N` passes of
Adam over the calibration batches on all its kept weights at once (attention, MLP and norms),
minimising the mean squared difference between the pruned stream after the layer and the dense
stream at the same point: i-SpaSP's "auxiliary training" (docs/methods.md §4.7) at the scale of a whole
block, as in block-wise reconstruction. The dense stream is the target, so the refinement also
corrects the drift of the layers before it. Removed weights stay exactly zero: they are masked
again after every step. A pass is kept only if it lowers the calibration error (else it is undone
and the step size halved), so the refinement never makes a layer worse on the data it sees. It
costs about four forward passes of the layer per pass (a training pass and an error check).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..calibration.layer_inputs import LayerInputs, first_output


@torch.no_grad()
def stream_error(layer: nn.Module, index: int, inputs: LayerInputs, dense_after: list[torch.Tensor]) -> float:
    """Mean squared difference between the layer's outputs and the dense stream, over all batches."""
    total = count = 0
    for output, target in zip(inputs.outputs(layer, index), dense_after):
        total += float(torch.sum((output.float() - target.float()) ** 2))
        count += target.numel()
    return total / count


def refine_toward_dense(
    layer: nn.Module,
    index: int,
    inputs: LayerInputs,
    dense_after: list[torch.Tensor],
    epochs: int,
    learning_rate: float,
    remask: Callable[[], None],
) -> tuple[float, float]:
    """Fit the layer's weights to `dense_after` with Adam; `remask` zeroes the removed weights
    after each step. Each tensor's step size is `learning_rate` times its RMS, so one setting
    suits weights and norm scales alike (all-zero tensors take the smallest RMS). A pass that
    does not lower the calibration error is undone and the step size halved. Returns the
    calibration error (before, after)."""
    best = before = stream_error(layer, index, inputs, dense_after)
    parameters = [p for p in layer.parameters() if p.is_floating_point()]
    scales = [float(p.detach().float().pow(2).mean().sqrt()) for p in parameters]
    smallest = min((s for s in scales if s > 0), default=1.0)
    scales = [s or smallest for s in scales]  # all-zero tensors (fresh biases) move like the finest weights
    requires_grad = [p.requires_grad for p in parameters]
    saved = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.Adam([{"params": [p], "lr": learning_rate * s} for p, s in zip(parameters, scales)])
    try:
        for p in parameters:
            p.requires_grad_(True)
        for _ in range(epochs):
            _one_pass(layer, index, inputs, dense_after, optimizer, remask)
            error = stream_error(layer, index, inputs, dense_after)
            with torch.no_grad():
                if error < best:
                    best = error
                    for kept, p in zip(saved, parameters):
                        kept.copy_(p)
                    continue
                for kept, p in zip(saved, parameters):
                    p.copy_(kept)
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["lr"] /= 2
    finally:
        for p, flag in zip(parameters, requires_grad):
            p.requires_grad_(flag)
    return before, best


@torch.enable_grad()
def _one_pass(layer, index, inputs: LayerInputs, dense_after, optimizer, remask) -> None:
    batches = zip(inputs.hidden, inputs.args[index], inputs.kwargs[index], dense_after)
    for hidden, args, kwargs, target in batches:
        output = first_output(layer(hidden, *args, **kwargs))
        torch.nn.functional.mse_loss(output.float(), target.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        remask()
