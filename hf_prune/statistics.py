"""One calibration pass → the statistics every data-aware criterion and repair reads.

Forward hooks accumulate, per layer, the input channels of each branch's consuming projection
(`o_proj`, `down_proj`, ...): counts, sums, sums of squares and, where asked, Gram matrices, each
batch computed in float32 and added into float64. Nothing is stored per token. Layer and branch
influence (`1 − cos(h_in, h_out)`) is accumulated the same way. Gradient criteria add one
backward pass per batch, summing gradients and squared gradients of the layers' parameters.
Without gradients the task head is skipped: only the base model runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .groups import ArchitectureAdapter, Branch
from .groups.base import channels_last

Requirement = Literal["moments", "mlp_gram", "influence", "gradients"]
REQUIREMENTS: tuple[Requirement, ...] = ("moments", "mlp_gram", "influence", "gradients")


@dataclass
class ChannelStatistics:
    """Moments of the input channels of one consuming projection."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    with_gram: bool = False

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if self.total is None:
            channels = x.shape[1]
            self.total = torch.zeros(channels, dtype=torch.float64, device=x.device)
            self.squares = torch.zeros(channels, dtype=torch.float64, device=x.device)
            if self.with_gram:
                self.gram = torch.zeros(channels, channels, dtype=torch.float64, device=x.device)
        self.count += x.shape[0]
        self.total += x.sum(0).double()
        self.squares += x.pow(2).sum(0).double()
        if self.with_gram:
            self.gram += (x.T @ x).double()

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def mean_square(self) -> torch.Tensor:
        return self.squares / self.count

    @property
    def variance(self) -> torch.Tensor:
        return (self.mean_square - self.mean.pow(2)).clamp_min(0)


@dataclass
class CalibrationStatistics:
    """Everything one calibration pass measured, keyed by (original) layer index."""

    consumers: dict[tuple[int, Branch], ChannelStatistics] = field(default_factory=dict)
    #: mean of 1 − cos(stream before, stream after) per token, for "layer", "attention", "mlp".
    influence: dict[tuple[int, str], float] = field(default_factory=dict)
    #: Σ over batches of the gradient, and of its square, per (layer, parameter name in the layer).
    gradient_sum: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    gradient_squares: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    batches: int = 0
    tokens: int = 0
    #: what was collected, so a reuse can check it has what its criteria need.
    requirements: frozenset[str] = frozenset()


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _one_minus_cos(before: torch.Tensor, after: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return 1 - nn.functional.cosine_similarity(before.float(), after.float(), dim=dim)


class _InfluenceRecorder:
    """Hooks that measure how much each layer and branch turns the residual stream."""

    def __init__(self, stats: CalibrationStatistics):
        self.stats = stats
        self.sums: dict[tuple[int, str], float] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.inputs: dict[int, torch.Tensor] = {}
        self.stream: dict[int, torch.Tensor] = {}

    def _add(self, key: tuple[int, str], values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + values.sum().item()
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def register(self, index: int, layer: nn.Module, adapter: ArchitectureAdapter) -> list:
        def layer_input(module, args, kwargs):
            self.inputs[index] = self.stream[index] = args[0] if args else kwargs["hidden_states"]

        def layer_output(module, args, kwargs, output):
            before, after = self.inputs.pop(index), _first(output)
            self._add((index, "layer"), _one_minus_cos(before, after, adapter.stream_channel_dim))
            self.stream.pop(index)

        def branch_output(branch: str):
            def hook(module, args, output):
                before = self.stream[index]
                after = before + _first(output)
                self._add((index, branch), _one_minus_cos(before, after))
                self.stream[index] = after  # the MLP of a sequential block reads stream + attention

            return hook

        handles = [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(layer_output, with_kwargs=True),
        ]
        for branch, name in (("attention", adapter.o_proj), ("mlp", adapter.down_proj)):
            # Branch outputs add to the stream only in families that prune branches.
            if f"{branch}_branches" in adapter.kinds and adapter.has_branch(layer, branch):
                handles.append(layer.get_submodule(name).register_forward_hook(branch_output(branch)))
        return handles

    def finish(self) -> None:
        for key, total in self.sums.items():
            self.stats.influence[key] = total / self.counts[key]


def _base_model(model: nn.Module) -> nn.Module:
    """The model without its task head (the LM head alone costs ~25% of a small LM's forward)."""
    return getattr(model, getattr(model, "base_model_prefix", ""), model)


def _model_inputs(batch: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    batch = batch.to(device)
    return {"pixel_values": batch} if batch.is_floating_point() else {"input_ids": batch}


def collect_statistics(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    batches: Iterable[torch.Tensor],
    requirements: set[Requirement],
) -> CalibrationStatistics:
    """Run the calibration batches once and return what `requirements` ask for."""
    stats = CalibrationStatistics(requirements=frozenset(requirements))
    layers = adapter.layers(model)
    handles = []
    if requirements & {"moments", "mlp_gram"}:
        for index, layer in enumerate(layers):
            for branch, name in (("attention", adapter.o_proj), ("mlp", adapter.down_proj)):
                if not adapter.has_branch(layer, branch):
                    continue
                # Attention Grams are small (heads × head_dim squared) and serve head criteria and repair.
                accumulator = ChannelStatistics(with_gram=branch == "attention" or "mlp_gram" in requirements)
                stats.consumers[(index, branch)] = accumulator
                module = layer.get_submodule(name)
                handles.append(
                    module.register_forward_pre_hook(lambda m, args, acc=accumulator: acc.add(channels_last(m, args[0])))
                )
    recorder = _InfluenceRecorder(stats) if "influence" in requirements else None
    if recorder:
        for index, layer in enumerate(layers):
            handles += recorder.register(index, layer, adapter)

    gradients = "gradients" in requirements
    layer_parameters = {id(p) for p in layers.parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in layer_parameters]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for parameter in frozen:  # embeddings and heads: no gradient needed, saves a large matmul
            parameter.requires_grad_(False)
        for batch in tqdm(list(batches), desc="calibration", unit="batch", leave=False):
            inputs = _model_inputs(batch, device)
            stats.batches += 1
            stats.tokens += batch.numel() if "input_ids" in inputs else batch.shape[0]
            if not gradients:
                with torch.no_grad():
                    _base_model(model)(**inputs)
                continue
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            for index, layer in enumerate(layers):
                for name, parameter in layer.named_parameters():
                    if parameter.grad is None:
                        continue
                    grad = parameter.grad.detach().double()
                    key = (index, name)
                    if key in stats.gradient_sum:
                        stats.gradient_sum[key] += grad
                        stats.gradient_squares[key] += grad.pow(2)
                    else:
                        stats.gradient_sum[key], stats.gradient_squares[key] = grad, grad.pow(2)
            model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for parameter in frozen:
            parameter.requires_grad_(True)
        model.train(was_training)
    if recorder:
        recorder.finish()
    return stats
