"""A tensor slice: the unit every dependency group is made of (its own module, so that `base` and `experts`
both read it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TensorSlice:
    """Indices `[start, stop)` along `dim` of one parameter, named relative to its layer module.

    `consumer` marks the input columns of the projection that reads the group's output
    (`o_proj`, `down_proj`, ...): zeroing exactly these removes the group's contribution,
    which is the masking semantics every surgery is compared against.
    """

    parameter: str
    dim: int
    start: int
    stop: int
    consumer: bool = False

    def numel(self, layer: nn.Module) -> int:
        """How many parameters of `layer` the slice holds."""
        parameter = layer.get_parameter(self.parameter)
        return parameter.numel() // parameter.shape[self.dim] * (self.stop - self.start)
