"""Loss: the exact change of the calibration loss when one layer or branch is removed.

Each candidate is masked with the engine's own semantics (`masking.apply_masks`), the loss is
measured on the first `max_windows` calibration windows (`calibration_loss`: for images, against
the dense model's predictions), and the weights are restored. One
forward pass over those windows per candidate: affordable for layers and branches only.

Method notes and sources: docs/methods.md §3.9.
"""

from collections.abc import Sequence

import torch

from ..calibration.loss import calibration_loss, dense_predictions
from ..calibration.statistics import model_inputs
from ..groups import Group
from ..kinds import BLOCK_KINDS
from ..masking import apply_masks
from ..plan import PruningPlan
from .base import Criterion, ScoringContext
from .registry import register_criterion


@torch.no_grad()
def mean_loss(context: ScoringContext, windows: torch.Tensor, targets: list[torch.Tensor | None]) -> float:
    """Calibration loss over the windows (image targets: the dense model's predictions, per batch)."""
    device = next(context.model.parameters()).device
    total = 0.0
    for batch, target in zip(windows.split(context.batch_size), targets):
        total += calibration_loss(context.model, model_inputs(batch, device), target).item() * batch.shape[0]
    return total / windows.shape[0]


@register_criterion
class LossCriterion(Criterion):
    name = "loss"
    kinds = BLOCK_KINDS
    needs_windows = True
    max_windows = 16

    def score(self, context: ScoringContext, groups: Sequence[Group]) -> torch.Tensor:
        windows = context.windows[: self.max_windows]
        if not hasattr(self, "_dense_loss"):
            device = next(context.model.parameters()).device
            self._targets = [
                dense_predictions(context.model, model_inputs(batch, device))
                for batch in windows.split(context.batch_size)
            ]
            self._dense_loss = mean_loss(context, windows, self._targets)
        scores = []
        for group in groups:
            plan = PruningPlan.keep_all(context.model, context.adapter)
            layer_plan = plan.layers[group.layer]
            if group.kind == "layers":
                layer_plan.keep_layer = False
            elif group.kind == "attention_branches":
                layer_plan.keep_attention = False
            else:
                layer_plan.keep_mlp = False
            layer = context.layer(group.layer)
            saved = {name: p.detach().clone() for name, p in layer.named_parameters()}
            handles = apply_masks(context.model, context.adapter, plan)
            try:
                scores.append(mean_loss(context, windows, self._targets) - self._dense_loss)
            finally:
                for handle in handles:
                    handle.remove()
                for name, parameter in layer.named_parameters():
                    parameter.data.copy_(saved[name])
        return torch.tensor(scores, dtype=torch.float64)
