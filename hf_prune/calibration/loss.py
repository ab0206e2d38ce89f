"""The calibration loss that gradient criteria differentiate and the `loss` criterion compares.

Language models: next-token cross-entropy on the calibration window itself. Image classifiers:
calibration images carry no labels (any image folder calibrates), so the loss is the
cross-entropy against the dense model's own top-1 predictions. A group then scores by how much
it moves the model's decisions: the pseudo-label form of the Taylor and Fisher criteria, which
Molchanov et al. (2019) state with true labels.

Method notes and sources: docs/methods.md §2.
"""

from __future__ import annotations

import torch
from torch import nn


def calibration_loss(
    model: nn.Module, inputs: dict[str, torch.Tensor], targets: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean loss of one calibration batch; for images, against `targets` (default: the top-1
    predictions of this same forward, which are the dense model's when it is dense)."""
    if "input_ids" in inputs:
        return model(**inputs, labels=inputs["input_ids"]).loss
    logits = model(**inputs).logits
    if targets is None:
        targets = logits.detach().argmax(-1)
    return nn.functional.cross_entropy(logits, targets)


@torch.no_grad()
def dense_predictions(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The targets `calibration_loss` needs to score a changed model: top-1 classes for images,
    None for token windows (their targets are the tokens)."""
    return None if "input_ids" in inputs else model(**inputs).logits.argmax(-1)
