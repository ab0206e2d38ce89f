"""Calibration across processes: run under `torchrun --nproc_per_node N` and every process
calibrates on its own share of the batches.

hf_prune adds no runtime of its own: accelerate's `PartialState` sets up the process group
(gloo on CPU, nccl on GPU) from torchrun's environment. The statistics every process collected
are summed (in float64) before scoring, the main process computes the plan and broadcasts it, so
every process cuts the same groups, and only the main process writes or uploads. `prune` must run
on every process; `save_pretrained` and `push_to_hub` need not (they hold no collective). With a single
process none of this runs and no process group is started.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState

from ..errors import InvalidPruningTargetError

Item = TypeVar("Item")


def process_state() -> PartialState | None:
    """accelerate's state when this run spans several processes, else `None`.

    Without an accelerator, `PartialState()` would see a single process; `cpu=True` makes it join
    torchrun's processes over gloo. A state the caller created first (e.g. an `Accelerator`) is reused.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not launched and not (dist.is_available() and dist.is_initialized()):
        return None
    state = PartialState(cpu=not torch.accelerator.is_available())
    return state if state.num_processes > 1 else None


def is_main_process() -> bool:
    """True in the process that writes files: the only one, or rank 0."""
    state = process_state()
    return state is None or state.is_main_process


def local_share(batches: Sequence[Item]) -> list[Item]:
    """This process's batches: every `num_processes`-th one, starting at its rank.

    Batches are dealt whole, so each is computed exactly as a single process would; an uneven
    count leaves some processes one batch more.
    """
    state = process_state()
    if state is None:
        return list(batches)
    if len(batches) < state.num_processes:
        raise InvalidPruningTargetError(
            f"{len(batches)} calibration batches cannot feed {state.num_processes} processes; raise num_samples "
            "or lower batch_size so that every process gets at least one batch."
        )
    return list(batches[state.process_index :: state.num_processes])


def sum_across_processes(tensors: Sequence[torch.Tensor]) -> None:
    """Sum tensors in place over all processes, flattened into one float64 all-reduce per device.

    The result is identical on every process; it differs from one process's running sum only by
    the order of the float64 additions.
    """
    state = process_state()
    if state is None or not tensors:
        return
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    for group in by_device.values():
        flat = torch.cat([t.detach().reshape(-1).double() for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for tensor, value in zip(group, flat.split([t.numel() for t in group])):
            tensor.copy_(value.view_as(tensor))


def sum_numbers(values: Sequence[float]) -> list[float]:
    """Python numbers (counts, scalar sums) summed over all processes; exact for counts below 2**53."""
    state = process_state()
    if state is None or not values:
        return list(values)
    flat = torch.tensor(list(values), dtype=torch.float64, device=_collective_device(state))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    return flat.tolist()


def from_main_process(value: Item) -> Item:
    """The main process's `value`, on every process (a plan: plain data, not tensors)."""
    state = process_state()
    if state is None:
        return value
    holder = [value if state.is_main_process else None]
    dist.broadcast_object_list(holder, src=0, device=_collective_device(state))
    return holder[0]


def _collective_device(state: PartialState) -> torch.device:
    """nccl only moves GPU tensors; gloo moves CPU ones."""
    return state.device if state.backend == "nccl" else torch.device("cpu")
