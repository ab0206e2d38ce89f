"""Masks on a model that keeps training: the engine's masking semantics, re-applied after every step.

The optimizer keeps updating every parameter it holds (moments, weight decay), so a mask is not
applied once: `apply` zeroes the masked slices again after each optimizer step, and is
idempotent. Removed layers get their identity hook once, when they are first removed. Removed routed
experts are masked as the engine masks them, by a router hook that never selects them (their logit is −∞
before the top-k, `masking.kept_experts_hook`), re-hooked whenever the kept set shrinks; their weights
are left as they are (no token reaches them, so they get no gradient, and the cut drops them).

Under PEFT LoRA the consumer projection computes `x W_eff` with `W_eff = W + s·B·A`. A masked
input column `j` is zeroed in `W` and in `A` (column `j`), so `W_eff[:, j] = 0` whatever `B`
learns; a masked branch zeroes `W`, its bias and all of `B`, so its output is zero. Merging the
adapters therefore keeps exactly the same zeros. Adapters that rescale columns (DoRA) are refused.

With `keep_originals=True` (distillation from a PEFT student's own base, `distillation.py`) the values a
mask zeroes are kept, per parameter and dimension as an index list and the gathered values, so that
`unmasked()` can hand the teacher the unmasked base for one forward and zero the same entries again
(the routers' hooks are lifted for that forward too: the teacher routes over every expert).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from ..groups import ArchitectureAdapter
from ..masking import hook_kept_experts, masked_slices
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

    def __init__(self, adapter: ArchitectureAdapter, plan: PruningPlan, keep_originals: bool = False):
        self.adapter = adapter
        self.plan = plan
        self._layer_hooks: dict[int, list[RemovableHandle]] = {}
        #: layer → (the experts its router may select, the layer, the router hook)
        self._router_hooks: dict[int, tuple[tuple[int, ...], nn.Module, RemovableHandle]] = {}
        #: (parameter, dim) → (indices along dim, their original values), when `keep_originals`.
        self._originals: dict[tuple[int, int], tuple[nn.Parameter, torch.Tensor, torch.Tensor]] | None = (
            {} if keep_originals else None
        )
        self._recorded_plan: PruningPlan | None = None

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked slice (base weights and LoRA adapters); hook newly removed layers."""
        layers = self.adapter.layers(model)
        if self._originals is not None and self._recorded_plan is not self.plan:
            self._record_originals(layers)
        for layer_plan in self.plan.layers:
            layer = layers[layer_plan.layer]
            if not layer_plan.keep_layer:
                if layer_plan.layer not in self._layer_hooks:
                    self._layer_hooks[layer_plan.layer] = self.adapter.skip_layer(model, layer_plan.layer)
                continue
            for piece in masked_slices(self.adapter, layer, layer_plan):
                layer.get_parameter(piece.parameter).narrow(piece.dim, piece.start, piece.stop - piece.start).zero_()
            self._hook_router(layer_plan.layer, layer, layer_plan.experts if layer_plan.changes_experts else None)
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

    def _hook_router(self, index: int, layer: nn.Module | None, kept: tuple[int, ...] | None) -> None:
        """Keep layer `index`'s router hooked to select only the `kept` experts (None: every expert)."""
        current = self._router_hooks.get(index)
        if current is not None and current[0] == kept:
            return
        if current is not None:
            current[2].remove()
            del self._router_hooks[index]
        if kept is not None:
            self._router_hooks[index] = (kept, layer, hook_kept_experts(self.adapter, layer, kept))

    def _record_originals(self, layers) -> None:
        """Gather the original values of the entries the plan masks that are not kept yet (before zeroing them)."""
        new: dict[tuple[int, int], tuple[nn.Parameter, list[torch.Tensor]]] = {}
        for layer_plan in self.plan.layers:
            if not layer_plan.keep_layer:
                continue
            layer = layers[layer_plan.layer]
            for piece in masked_slices(self.adapter, layer, layer_plan):
                parameter = layer.get_parameter(piece.parameter)
                key = (id(parameter), piece.dim)
                new.setdefault(key, (parameter, []))[1].append(torch.arange(piece.start, piece.stop))
        with self._restored():  # every kept value is gathered from the unmasked tensor
            for key, (parameter, pieces) in new.items():
                indices = torch.cat(pieces).unique().to(parameter.device)
                _, known, values = self._originals.get(key, (parameter, indices[:0], None))
                indices = indices[~torch.isin(indices, known)]
                if not len(indices):
                    continue
                gathered = parameter.detach().index_select(key[1], indices).clone()
                if values is not None:
                    indices, gathered = torch.cat([known, indices]), torch.cat([values, gathered], dim=key[1])
                self._originals[key] = (parameter, indices, gathered)
        self._recorded_plan = self.plan

    @contextlib.contextmanager
    def _restored(self):
        with torch.no_grad():
            for (_, dim), (parameter, indices, values) in self._originals.items():
                parameter.index_copy_(dim, indices, values)
        routers = {index: (kept, layer) for index, (kept, layer, _) in self._router_hooks.items()}
        for index in routers:
            self._hook_router(index, None, None)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, dim), (parameter, indices, _) in self._originals.items():
                    parameter.index_fill_(dim, indices, 0)
            for index, (kept, layer) in routers.items():
                self._hook_router(index, layer, kept)

    def unmasked(self) -> contextlib.AbstractContextManager:
        """A context in which the masked base weights hold their original values (zeroed again on exit) and every
        routed expert may be selected. Needs `keep_originals=True`; LoRA adapters and the removed layers'
        identity hooks are not undone."""
        if self._originals is None:
            raise UsageError("TrainingMasks.unmasked() needs keep_originals=True.")
        return self._restored()

    def remove_hooks(self) -> None:
        for handles in self._layer_hooks.values():
            for handle in handles:
                handle.remove()
        self._layer_hooks.clear()
        for _, _, handle in self._router_hooks.values():
            handle.remove()
        self._router_hooks.clear()
