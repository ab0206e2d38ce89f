"""Torch-Pruning (Fang et al. 2023, `pip install hf_prune[bench]`) at the benchmark's budgets, as a user would run it.

`MetaPruner` traces the model (`output_transform=lambda out: out.logits`), builds its dependency
graph and removes the lowest-importance channels of every group rooted at the allowed layers:
MLP neurons are the groups rooted at `gate_proj`/`up_proj`; KV groups use its head pruning
(`num_heads`, `prune_num_heads=True`). Everything else is in `ignored_layers`, so the budget is
the same as hf_prune's. Afterwards the attention modules' head counts are set from the new
shapes, as Torch-Pruning's own LLM example does; it does not update the config.

`prune_image_classifier` does the same for the CIFAR-10 reference models (`benchmark_vision.py`).
"""

from __future__ import annotations

import copy
import signal
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn

from hf_prune.calibration.loss import calibration_loss

#: Torch-Pruning's GQA head pruning did not finish in 60 s even on the 4-layer tiny Llama; a row that exceeds
#: this fails.
TIME_LIMIT_SECONDS = 180
#: Taylor importance: calibration windows in the backward pass (one accumulated backward over
#: 128 × 512 tokens costs minutes on the shared 2-core machine; hf_prune's `taylor` uses all 128).
TAYLOR_WINDOWS = 8


@contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise TimeoutError(f"torch-pruning did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def prune_with_torch_pruning(model: nn.Module, row: dict, windows: torch.Tensor) -> None:
    """Prune `model` in place to the row's budget (`mlp_neurons` fraction or `kv_groups` count)."""
    layers = model.model.layers
    config = model.config
    kwargs: dict = {}
    if "mlp_neurons" in row:
        roots = {m for layer in layers for m in (layer.mlp.gate_proj, layer.mlp.up_proj)}
        kwargs["pruning_ratio"] = row["mlp_neurons"]
    else:
        roots = {
            m for layer in layers for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        }
        num_heads = {}
        for layer in layers:
            num_heads[layer.self_attn.q_proj] = config.num_attention_heads
            num_heads[layer.self_attn.k_proj] = num_heads[layer.self_attn.v_proj] = config.num_key_value_heads
        kwargs.update(
            pruning_ratio=0.0,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=row["kv_groups"] / config.num_key_value_heads,
        )
    ignored = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in roots]
    importance = (
        tp.importance.MagnitudeImportance(p=2)
        if row["torch_pruning"] == "magnitude"
        else tp.importance.TaylorImportance()
    )
    example = windows[:1, :64]
    with time_limit(TIME_LIMIT_SECONDS):
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            importance=importance,
            ignored_layers=ignored,
            output_transform=lambda out: out.logits,
            global_pruning=False,
            **kwargs,
        )
        if row["torch_pruning"] == "taylor":
            model.zero_grad()
            for batch in windows[:TAYLOR_WINDOWS].split(2):
                model(batch, labels=batch).loss.backward()
        pruner.step()
    model.zero_grad(set_to_none=True)
    for layer in layers:
        attention = layer.self_attn
        attention.num_heads = attention.q_proj.out_features // attention.head_dim
        attention.num_key_value_heads = attention.k_proj.out_features // attention.head_dim
        attention.num_key_value_groups = attention.num_heads // attention.num_key_value_heads


def _prune_image_classifier_once(
    model: nn.Module, adapter, ratio: float, importance: str, pixels: torch.Tensor
) -> None:
    if "channels" in adapter.kinds:  # ResNet / ConvNeXt: every convolution's output channels
        roots = {m for m in model.modules() if isinstance(m, nn.Conv2d)}
    else:  # ViT / DeiT: MLP neurons (the output channels of fc1)
        roots = {layer.get_submodule(adapter.up_proj) for layer in adapter.layers(model)}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m not in roots]
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=pixels[:1],
        importance=tp.importance.MagnitudeImportance(p=2)
        if importance == "magnitude"
        else tp.importance.TaylorImportance(),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        output_transform=lambda out: out.logits,
        global_pruning=False,
    )
    if importance == "taylor":
        model.zero_grad()
        for batch in pixels.split(32):
            calibration_loss(model, {"pixel_values": batch}).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)


def prune_image_classifier(
    model: nn.Module, adapter, fraction: float, importance: str, pixels: torch.Tensor
) -> tuple[nn.Module, float]:
    """A copy of `model` with about `fraction` of its parameters removed, and the fraction reached.

    Convolutional models lose output channels of every convolution (stage and inner channels alike,
    as Torch-Pruning's dependency graph couples them); ViT loses MLP neurons only, so budgets above
    the MLP's share of the parameters are unreachable (ValueError). Torch-Pruning's `pruning_ratio`
    counts channels, not parameters: it is bisected until the parameter fraction matches. Taylor
    importance differentiates `hf_prune.calibration.loss` (cross-entropy against the model's own
    predictions) on the calibration images.
    """
    total = sum(p.numel() for p in model.parameters())
    low, high, best = 0.0, 0.95, None
    for _ in range(14):
        ratio = (low + high) / 2
        candidate = copy.deepcopy(model)
        _prune_image_classifier_once(candidate, adapter, ratio, importance, pixels)
        removed = 1 - sum(p.numel() for p in candidate.parameters()) / total
        if best is None or abs(removed - fraction) < abs(best[1] - fraction):
            best = (candidate, removed)
        low, high = (ratio, high) if removed < fraction else (low, ratio)
    if abs(best[1] - fraction) > 0.02:
        raise ValueError(f"Torch-Pruning reaches {best[1]:.1%} of the parameters at best here, not {fraction:.0%}")
    return best
