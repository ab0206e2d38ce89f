"""NaN and Inf checks: the weights before calibration, the statistics before any criterion or solve.

One non-finite weight or activation turns every sum it enters into NaN or Inf, and the first
least-squares solve then fails inside `torch.linalg` with an error that names nothing. These checks
raise `NonFiniteError` instead, naming the tensor or the layer. Each tensor is tested by one
reduction: its sum (accumulated in float32 at least) is NaN or ±Inf exactly when an element is,
unless finite elements overflow the sum, so no element-wise mask is allocated; NaN and Inf are
counted only in the tensors that fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import NonFiniteError

if TYPE_CHECKING:
    from .calibration.statistics import CalibrationStatistics
    from .groups import ArchitectureAdapter

#: weight tensors named in a message; the rest are counted.
SHOWN = 3
UNCHANGED = "Nothing was pruned; the model is unchanged."


def _is_non_finite(tensor: torch.Tensor) -> bool:
    total = tensor.detach().sum(dtype=torch.promote_types(tensor.dtype, torch.float32))
    return not bool(torch.isfinite(total))


def _counts(tensor: torch.Tensor) -> str:
    """'2 NaN, 1 Inf' ('' when the tensor is finite and only its sum overflowed)."""
    counts = ((int(tensor.isnan().sum()), "NaN"), (int(tensor.isinf().sum()), "Inf"))
    return ", ".join(f"{count:,} {kind}" for count, kind in counts if count)


def check_finite_weights(
    named_tensors: Iterable[tuple[str, torch.Tensor]], source: str = "the model", outcome: str = UNCHANGED
) -> None:
    """Raise `NonFiniteError` naming every floating weight of `named_tensors` that holds NaN or Inf
    (meta tensors, which hold no values, are skipped). `outcome` ends the message: what the failed
    prune has changed."""
    offenders = []
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and tensor.device.type != "meta" and _is_non_finite(tensor):
            counts = _counts(tensor)
            if counts:
                offenders.append(f"{name}: {counts} of {tensor.numel():,} values")
    if offenders:
        more = f"; and {len(offenders) - SHOWN} more" if len(offenders) > SHOWN else ""
        raise NonFiniteError(
            f"{len(offenders)} weight tensor(s) of {source} hold NaN or Inf, so no score or least-squares repair "
            f"can be computed: {'; '.join(offenders[:SHOWN])}{more}. The checkpoint is damaged, or it overflowed "
            "when it was cast (float16 holds at most 65504): load it in its original dtype or in float32/bfloat16 "
            f"(torch_dtype=torch.float32), or repair these tensors before pruning. {outcome}"
        )


def check_finite_statistics(
    stats: CalibrationStatistics, adapter: ArchitectureAdapter, model: nn.Module, outcome: str = UNCHANGED
) -> None:
    """Raise `NonFiniteError` when anything the calibration pass measured in `stats` is NaN or Inf,
    naming the first place (the consumers in layer order: those after a fault inherit it) and counting
    the others.
    Called once the sums are complete (across processes too), before any criterion or solve."""
    layers = adapter.layers_name(model)
    projection = {"attention": adapter.o_proj, "mlp": adapter.down_proj}
    offenders = []

    def check(where: str, sums: dict[str, torch.Tensor | None]) -> None:
        broken = [name for name, tensor in sums.items() if tensor is not None and _is_non_finite(tensor)]
        if broken:
            offenders.append(f"{where} ({', '.join(broken)})")

    def moments(accumulator) -> dict[str, torch.Tensor | None]:
        return {"sum": accumulator.total, "sum of squares": accumulator.squares, "Gram matrix": accumulator.gram}

    for index, branch in sorted(stats.consumers):
        check(f"the inputs of {layers}.{index}.{projection[branch]}", moments(stats.consumers[(index, branch)]))
    for stage in sorted(stats.streams):
        check(f"the outputs of stage {stage}", moments(stats.streams[stage]))
    for name in sorted(stats.stream_consumers):
        check(f"the inputs of {name}", moments(stats.stream_consumers[name]))
    for index, name in sorted(stats.gradient_sum):
        check(
            f"the gradient of {layers}.{index}.{name}",
            {"sum": stats.gradient_sum[(index, name)], "sum of squares": stats.gradient_squares[(index, name)]},
        )
    for (index, kind), value in sorted(stats.influence.items()):
        if not math.isfinite(value):
            offenders.append(f"the {kind} influence of {layers}.{index} ({value})")
    if offenders:
        later = f", and at {len(offenders) - 1} later place(s)" if len(offenders) > 1 else ""
        raise NonFiniteError(
            f"the calibration statistics hold NaN or Inf, first at {offenders[0]}{later}; no score or "
            "least-squares repair can be computed from them. The weights are finite (prune checks them first), so "
            "the activations overflowed or the calibration inputs hold NaN or Inf: run the model in float32 or "
            "bfloat16 (float16 overflows above 65504; torch_dtype=torch.float32), and check the calibration data "
            f"(finite pixel values, token ids within the vocabulary). {outcome}"
        )
