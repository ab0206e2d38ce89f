"""Least-squares repair at every pruning event of the `PruningCallback` (`repair="lstsq"`).

Between two events, forward pre-hooks on the consumer projections of the groups the config may mask
(`o_proj`-style for heads and KV groups, `down_proj`-style for MLP neurons) accumulate the moments and Gram
matrix `G = Σ x xᵀ` of their input over the training micro-batches (training-mode forwards with gradients
enabled: evaluation batches never count; every micro-batch of an accumulated step does), with the one-shot
prune's accumulator (`calibration.statistics.ChannelStatistics`). When an event masks new groups, every
consumer whose removed channels grew is refitted in place by the one-shot prune's least-squares step
(`repair.least_squares.refit_consumer`, docs/methods.md §4.1, §6.5):

    W'_S = W G[:, S] (G[S, S] + λI)⁻¹,    λ = damping · mean diag(G[S, S]) / count,

with `S` the channels still kept and `W` the consumer's current weight, whose columns masked at earlier events
are exactly 0: the refit reproduces what the model computed before this event's masks, from the channels
that stay. Only kept columns are written, and the masks then zero the new ones, so masking and the final
surgery agree exactly. The accumulators restart after every event; after the last one the hooks are removed.
Under torchrun the sums are added across processes before the solve (`calibration.statistics.sum_statistics`),
so every process refits alike.

Cost: one float64 Gram per consumer, `width² × 8` bytes, `width` being the consumer's input width (the
intermediate size for neurons, heads × head_dim for heads): for SmolLM2-135M with MLP neurons pruned,
30 × 1536² × 8 B = 566 MB (and 30 × 576² × 8 B = 80 MB more when heads are pruned too). Each training token
adds about (5/8)·width² multiply-adds per consumer (`calibration.statistics.add_gram`), forward only; each
event solves one Cholesky system of the kept width per consumer. With events every step (the default
`frequency=1`) a refit sees one optimizer step's tokens: fewer than the consumer's width, it can only fit
those (a warning says so); prune less often or raise `damping` then. Trainer checkpoints save the accumulators
(the same size on disk) so that a resumed run refits exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..calibration.distributed import is_main_process
from ..calibration.statistics import CalibrationStatistics, ChannelStatistics, sum_statistics
from ..errors import CallbackStateError
from ..finite import check_finite_statistics
from ..groups import ArchitectureAdapter, Branch
from ..groups.base import channels_last
from ..kinds import DAMPING
from ..plan import PruningPlan
from ..repair.least_squares import refit_consumer, removed_channels

logger = logging.getLogger(__name__)

#: The statistics a refit reads, as saved in a checkpoint (`count` as a one-element tensor).
_FIELDS = ("total", "squares", "gram")
#: What a failed statistics check leaves behind.
_OUTCOME = "No consumer was refitted at this pruning event."


def _record(accumulator: ChannelStatistics):
    def hook(module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            x = args[0]
            # Outside the run's autocast: a bf16 xᵀx would lose the Gram's positive definiteness (-1e-4 eigenvalues
            # against a 1e-6 ridge on the tiny test model); the accumulator's float32 blocks stay float32.
            with torch.autocast(x.device.type, enabled=False):
                accumulator.add(channels_last(module, x))

    return hook


class EventRepair:
    """Gram accumulators on the consumers of `branches` (every layer that has the branch) and the refit."""

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, branches: tuple[Branch, ...], damping: float = DAMPING
    ):
        self.adapter = adapter
        self.damping = damping
        self.statistics = CalibrationStatistics(requirements=frozenset({"moments", "mlp_gram"}))
        self._handles: dict[tuple[int, Branch], RemovableHandle] = {}
        self._warned = False  # one warning per run about refits from fewer tokens than channels
        for index, layer in enumerate(adapter.layers(model)):
            for branch in branches:
                if not adapter.has_branch(layer, branch):
                    continue
                accumulator = self.statistics.consumers[(index, branch)] = ChannelStatistics(with_gram=True)
                module = layer.get_submodule(adapter.o_proj if branch == "attention" else adapter.down_proj)
                self._handles[(index, branch)] = module.register_forward_pre_hook(_record(accumulator))

    @torch.no_grad()
    def refit(self, model: nn.Module, previous: PruningPlan, plan: PruningPlan) -> list[tuple[int, Branch]]:
        """Refit, in place, every consumer that `plan` removes more channels of than `previous`, from the
        inputs seen since the last event; then restart the accumulators. Returns the consumers refitted.
        The masks of `previous` must be in force (its columns exactly 0) and those of `plan` not yet."""
        consumers = self.statistics.consumers
        if not consumers or all(stats.count == 0 for stats in consumers.values()):
            return []  # no training batch since the last event (an event at step 0)
        sum_statistics(self.statistics)
        check_finite_statistics(self.statistics, self.adapter, model, outcome=_OUTCOME)
        layers = self.adapter.layers(model)
        refitted = []
        for (index, branch), stats in sorted(consumers.items()):
            layer_plan = plan.layers[index]
            if not layer_plan.keep_layer or branch in layer_plan.removed_branches() or stats.count == 0:
                continue
            layer = layers[index]
            removed = removed_channels(self.adapter, layer, layer_plan, branch)
            if len(removed) <= len(removed_channels(self.adapter, layer, previous.layers[index], branch)):
                continue
            refit_consumer(layer, self.adapter, layer_plan, branch, stats, "lstsq", damping=self.damping)
            refitted.append((index, branch))
            width = stats.total.numel()
            if stats.count < width and not self._warned:
                self._warned = True
                logger.warning(
                    "repair='lstsq' refitted layer %d's %s consumer from %d tokens, fewer than its %d input channels: "
                    "the refit can fit those tokens only; prune less often (PruningSchedule(frequency=...)), train "
                    "on more tokens per step, or raise PruningConfig(damping=...).",
                    index,
                    branch,
                    stats.count,
                    width,
                )
        self.drop_removed(plan)
        self.reset()
        return refitted

    def drop_removed(self, plan: PruningPlan) -> None:
        """Stop accumulating for the consumers of the layers and branches `plan` removes (nothing to refit)."""
        for key in list(self.statistics.consumers):
            layer_plan = plan.layers[key[0]]
            if not layer_plan.keep_layer or key[1] in layer_plan.removed_branches():
                self._handles.pop(key).remove()
                del self.statistics.consumers[key]

    def reset(self) -> None:
        """Zero every accumulator (kept allocated for the next event)."""
        for stats in self.statistics.consumers.values():
            stats.count = 0
            for name in _FIELDS:
                tensor = getattr(stats, name)
                if tensor is not None:
                    tensor.zero_()
        self.statistics.batches = self.statistics.tokens = 0

    def gather(self) -> None:
        """Before a checkpoint (every process calls it): the main process holds the sums over all processes
        and the others restart from zero, so the total is unchanged and the main process's state is all of it."""
        sum_statistics(self.statistics)
        if not is_main_process():
            self.reset()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The accumulators as flat tensors (`{layer}.{branch}.{field}`), for a Trainer checkpoint (after
        `gather`; a resumed run loads them on the main process only)."""
        state = {}
        for (index, branch), stats in self.statistics.consumers.items():
            state[f"{index}.{branch}.count"] = torch.tensor([stats.count], dtype=torch.int64)
            for name in _FIELDS:
                tensor = getattr(stats, name)
                if tensor is not None:
                    state[f"{index}.{branch}.{name}"] = tensor.detach().cpu().contiguous()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Restore the accumulators `state_dict` saved, onto `device` (call `drop_removed` with the restored
        plan first: the consumers of removed layers and branches are not saved)."""
        for (index, branch), stats in self.statistics.consumers.items():
            prefix = f"{index}.{branch}."
            if prefix + "count" not in state:
                raise CallbackStateError(
                    f"the checkpoint's repair statistics have no entry for layer {index} ({branch}); resume with "
                    "the same callback arguments as the run that wrote it."
                )
            stats.count = int(state[prefix + "count"].item())
            for name in _FIELDS:
                tensor = state.get(prefix + name)
                setattr(stats, name, None if tensor is None else tensor.to(device, copy=True))

    def remove_hooks(self) -> None:
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
