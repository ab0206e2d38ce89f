"""Masks on a model that keeps training: the engine's masking semantics, re-applied after every step.

The optimizer keeps updating every parameter it holds (moments, weight decay), so a mask is not
applied once: `apply` zeroes the masked slices again after each optimizer step, and is
idempotent. Removed layers get their identity hook once, when they are first removed.

Under PEFT LoRA the consumer projection computes `x W_eff` with `W_eff = W + s·B·A`. A masked
input column `j` is zeroed in `W` and in `A` (column `j`), so `W_eff[:, j] = 0` whatever `B`
learns; a masked branch zeroes `W`, its bias and all of `B`, so its output is zero. Merging the
adapters therefore keeps exactly the same zeros. Adapters that rescale columns (DoRA) are refused.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from ..groups import ArchitectureAdapter
from ..masking import identity_hook, masked_slices
from ..plan import PruningPlan


def _lora_parts(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The LoRA A and B projections of a consumer module (empty lists when it has no adapter)."""
    lora_a = getattr(module, "lora_A", None)
    if lora_a is None:
        if hasattr(module, "base_layer"):
            raise UsageError(
                f"{type(module).__name__} wraps a consumer projection with a PEFT adapter other than LoRA; "
                "PruningCallback masks LoRA adapters only. Use LoRA, or leave o_proj/down_proj-style modules out of "
                "target_modules."
            )
        return [], []
    if len(getattr(module, "lora_magnitude_vector", ())) or getattr(module, "lora_variant", None):
        raise UsageError(
            "LoraConfig(use_dora=True) (or another LoRA variant) rescales weight columns, so masked columns would "
            "not stay zero; use plain LoRA with PruningCallback."
        )
    return list(lora_a.values()), list(module.lora_B.values())


class TrainingMasks:
    """The current plan's masks on a live model, kept exact across optimizer steps."""

    def __init__(self, adapter: ArchitectureAdapter, plan: PruningPlan):
        self.adapter = adapter
        self.plan = plan
        self._layer_hooks: dict[int, RemovableHandle] = {}

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked slice (base weights and LoRA adapters); hook newly removed layers."""
        layers = self.adapter.layers(model)
        for layer_plan in self.plan.layers:
            layer = layers[layer_plan.layer]
            if not layer_plan.keep_layer:
                if layer_plan.layer not in self._layer_hooks:
                    self._layer_hooks[layer_plan.layer] = layer.register_forward_hook(identity_hook, with_kwargs=True)
                continue
            for piece in masked_slices(self.adapter, layer, layer_plan):
                layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
            for piece in layer_plan.removed_slices(self.adapter, layer):
                if piece.consumer:  # input features [start, stop) of the consumer projection
                    lora_a, _ = _lora_parts(layer.get_submodule(piece.parameter.rpartition(".")[0]))
                    for projection in lora_a:  # `nn.Linear(in_features, r)`: input features are dim 1
                        projection.weight.narrow(1, piece.start, piece.stop - piece.start).zero_()
            for branch in layer_plan.removed_branches():
                module_name = self.adapter.branch_consumer_slices(layer, branch)[0].parameter.rpartition(".")[0]
                _, lora_b = _lora_parts(layer.get_submodule(module_name))
                for projection in lora_b:
                    for parameter in projection.parameters():
                        parameter.zero_()

    def remove_hooks(self) -> None:
        for handle in self._layer_hooks.values():
            handle.remove()
        self._layer_hooks.clear()
