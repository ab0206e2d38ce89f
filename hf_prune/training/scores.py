"""Group importance from what training already computes: the training batches' activations and gradients.

Every group is scored at the place masking acts on it (`masking.py`): a head's or neuron's
*consumer inputs* (the input columns of `o_proj` / `down_proj` it feeds), a branch's *output*
(its output projection's result), a layer's *residual update* (output − input). Call that
tensor `z` and its gradient `∂L/∂z`; masking sets `z` to 0, so to first order the loss changes
by `−c` with `c = Σ z·∂L/∂z` summed over the group's entries and the step's tokens. For consumer
columns `c` equals `Σ g·w` over the masked weight slice exactly (and over `W + BA` under LoRA,
whose base weights have no gradient of their own), which is why hooks on activations, not
parameter gradients, are used.

- `taylor` (Molchanov et al. 2019): `Σ_steps |c|`, the size of the first-order loss change.
- `movement` (Sanh et al. 2020): `Σ_steps −c` = `−Σ g·w`, positive when the group moves away
  from zero (removing it would raise the loss).
- `activation`: `‖z‖₂` over every training token seen.

A routed expert (kind `experts`) is masked by never being selected, which (but for the renormalisation of
the other top-k weights) sets its gate weight to 0 wherever the router chose it: `z` is the gate weight
`g_j(x)` of every (token, chosen expert) pair, as the router hands it to the experts module, summed per
expert. The MoE output is `Σ_k g_k(x)·f_k(x)`, so `g_j·∂L/∂g_j = (g_j·f_j(x))·∂L/∂y` is the first-order
change of the loss when expert `j`'s contribution to that token goes (`taylor`, `movement`), and
`activation` is `(Σ g_j(x)²)^½` over the tokens routed to `j` (routing frequency and gate weight in one).

Only training-mode forwards with gradients enabled count (evaluation batches never do). A step's
`c` is summed over all its micro-batches before `|·|`, so gradient accumulation scores the
optimizer step, not the micro-batch. Under fp16 loss scaling gradients (hence `taylor` and
`movement`) carry the loss scale; bf16 and fp32 do not. Under gradient checkpointing the
recomputed forward would count twice; the callback is not meant to run with it.

In multi-process runs each process sees its own batches; `synchronize` sums the accumulators
over processes before every pruning decision, so every process takes the same one.

Method notes and sources: docs/methods.md §6.2.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..calibration.statistics import routing_arguments
from ..errors import InvalidPruningTargetError, UsageError
from ..groups import ArchitectureAdapter, Group, GroupKind
from ..groups.base import in_features

TRAINING_SCORES = ("taylor", "movement", "activation")
_FEATURE_KINDS = ("heads", "kv_groups", "neurons")
_BRANCH_KINDS = ("attention_branches", "mlp_branches")


@dataclass
class _Target:
    """How one (kind, layer)'s group scores come from one site's per-step buffer."""

    site: str
    group_ids: torch.Tensor | None  # feature sites: the group of every feature (−1: none); else one group
    groups: int


class TrainingScores:
    """Hooks that accumulate `taylor`, `movement` or `activation` scores for the kinds asked for."""

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter, kinds: Iterable[GroupKind], score: str):
        if score not in TRAINING_SCORES:
            raise UsageError(f"score={score!r} is not a training score; choose one of {', '.join(TRAINING_SCORES)}.")
        self.score_name = score
        self._sites: set[str] = set()
        self._step: dict[str, torch.Tensor] = {}  # site → this optimizer step's sums (float64, on the model's device)
        self._targets: dict[str, _Target] = {}  # "kind.layer" → target
        self.pending: dict[str, torch.Tensor] = {}  # "kind.layer" → not yet synchronized
        self.total: dict[str, torch.Tensor] = {}  # "kind.layer" → synchronized
        self._handles: list[RemovableHandle] = []
        for index, layer in enumerate(adapter.layers(model)):
            for kind in kinds:
                groups = adapter.groups(layer, index, kind)
                if groups:
                    self._add_target(layer, index, kind, groups, adapter)
        for key, target in self._targets.items():
            self.pending[key] = torch.zeros(target.groups, dtype=torch.float64)
            self.total[key] = torch.zeros(target.groups, dtype=torch.float64)

    # ------------------------------------------------------------------ hooks
    def _add_target(
        self, layer: nn.Module, index: int, kind: GroupKind, groups: Sequence[Group], adapter: ArchitectureAdapter
    ) -> None:
        if kind in _FEATURE_KINDS:
            module_name = None
            ids = None
            for group in groups:
                for piece in group.slices:
                    if not piece.consumer:
                        continue
                    name = piece.parameter.rpartition(".")[0]
                    if module_name is None:
                        module_name = name
                        ids = torch.full((in_features(layer.get_submodule(name)),), -1, dtype=torch.long)
                    if name != module_name:
                        raise NotImplementedError(f"{kind} of layer {index} are consumed by two modules")
                    ids[piece.start : piece.stop] = group.index
            site = f"{index}:{module_name}:in"
            if site not in self._sites:
                self._hook_input(layer.get_submodule(module_name), site)
            self._targets[f"{kind}.{index}"] = _Target(site, ids, len(groups))
        elif kind == "experts":
            layout = adapter.experts_of(layer)
            if layout.per_expert:
                raise InvalidPruningTargetError(
                    f"score={self.score_name!r} reads the gate weights the router hands the experts, which a "
                    "per-expert module list's block applies itself; use score='criterion' with "
                    "criterion={'experts': 'magnitude', ...}."
                )
            site = f"{index}:{layout.experts_module}:gates"
            self._hook_gates(layer.get_submodule(layout.experts_module), site, len(groups))
            self._targets[f"{kind}.{index}"] = _Target(site, torch.arange(len(groups)), len(groups))
        elif kind in _BRANCH_KINDS:
            pieces = adapter.branch_consumer_slices(layer, "attention" if kind == "attention_branches" else "mlp")
            module_name = pieces[0].parameter.rpartition(".")[0]
            site = f"{index}:{module_name}:out"
            self._hook_output(layer.get_submodule(module_name), site)
            self._targets[f"{kind}.{index}"] = _Target(site, None, 1)
        else:
            site = f"{index}:layer"
            self._hook_layer(layer, site)
            self._targets[f"{kind}.{index}"] = _Target(site, None, 1)

    def _add(self, site: str, values: torch.Tensor, features: bool) -> None:
        summed = values.flatten(0, -2).sum(0) if features else values.sum().reshape(1)
        summed = summed.to(torch.float64)  # stays on the device: no sync per micro-batch
        self._step[site] = self._step[site] + summed if site in self._step else summed

    def _observe(self, site: str, z: torch.Tensor, features: bool) -> None:
        """Record `z` of a training forward: its square now (activation) or `z·∂L/∂z` in backward."""
        if not torch.is_grad_enabled():
            return
        if self.score_name == "activation":
            self._add(site, z.detach().float().pow(2), features)
        elif z.requires_grad:
            saved = z.detach()
            z.register_hook(lambda grad: self._add(site, saved.float() * grad.float(), features))

    def _hook_input(self, module: nn.Module, site: str) -> None:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if module.training:
                self._observe(site, args[0] if args else next(iter(kwargs.values())), features=True)

        self._sites.add(site)
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook_gates(self, module: nn.Module, site: str, experts: int) -> None:
        """A pre-hook on an experts module called as `experts(hidden, top_k_index, top_k_weights)`: `z` is the
        gate weights, summed per expert (one feature per expert)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not module.training:
                return
            _, indices, weights = routing_arguments(args, kwargs)
            flat = indices.detach().reshape(-1)

            def per_expert(values: torch.Tensor) -> torch.Tensor:
                summed = torch.zeros(experts, dtype=torch.float64, device=values.device)
                return summed.index_add_(0, flat, values.reshape(-1).to(torch.float64)).unsqueeze(0)

            if not torch.is_grad_enabled():
                return
            if self.score_name == "activation":
                self._add(site, per_expert(weights.detach().float().pow(2)), features=True)
            elif weights.requires_grad:
                saved = weights.detach()
                weights.register_hook(
                    lambda grad: self._add(site, per_expert(saved.float() * grad.float()), features=True)
                )

        self._sites.add(site)
        self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _hook_output(self, module: nn.Module, site: str) -> None:
        def hook(module: nn.Module, args: tuple, output) -> None:
            if module.training:
                self._observe(site, output[0] if isinstance(output, tuple) else output, features=False)

        self._handles.append(module.register_forward_hook(hook))

    def _hook_layer(self, layer: nn.Module, site: str) -> None:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if not module.training:
                return
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            delta = (hidden_out - hidden_in).detach()  # what removing the layer takes away
            if not torch.is_grad_enabled():
                return
            if self.score_name == "activation":
                self._add(site, delta.float().pow(2), features=False)
            elif hidden_out.requires_grad:
                hidden_out.register_hook(lambda grad: self._add(site, delta.float() * grad.float(), False))

        self._handles.append(layer.register_forward_hook(hook, with_kwargs=True))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ accumulation
    def end_step(self) -> None:
        """Fold the finished optimizer step's sums into the per-group accumulators."""
        for key, target in self._targets.items():
            values = self._step.get(target.site)
            if values is None:  # no gradient reached this site in this step
                continue
            values = values.cpu()
            if target.group_ids is None:
                per_group = values
            else:
                known = target.group_ids >= 0
                per_group = torch.zeros(target.groups, dtype=torch.float64).index_add_(
                    0, target.group_ids[known], values[known]
                )
            if self.score_name == "taylor":
                per_group = per_group.abs()
            elif self.score_name == "movement":
                per_group = -per_group
            self.pending[key] += per_group
        self._step.clear()

    def synchronize(self, device: torch.device) -> None:
        """Sum the pending accumulators over processes (when distributed) into the totals."""
        keys = sorted(self.pending)
        if not keys:
            return
        flat = torch.cat([self.pending[key] for key in keys])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = flat.to(device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat = flat.cpu()
        for key, part in zip(keys, flat.split([self.pending[key].numel() for key in keys])):
            self.total[key] += part
            self.pending[key].zero_()

    def scores(self, model: nn.Module, adapter: ArchitectureAdapter, groups: Sequence[Group]) -> torch.Tensor:
        """A `gradual.ScoreFunction`: the synchronized scores of one kind's groups in one layer."""
        key = f"{groups[0].kind}.{groups[0].layer}"
        if key not in self.total:
            raise KeyError(f"no training scores were collected for {key}")
        total = self.total[key]
        return total.sqrt() if self.score_name == "activation" else total.clone()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"total.{key}": value for key, value in self.total.items()},
            **{f"pending.{key}": value for key, value in self.pending.items()},
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.state_dict())
        if set(state) != expected:
            raise ValueError(f"saved scores cover {sorted(set(state) ^ expected)[:4]}... differently")
        for name, value in state.items():
            which, _, key = name.partition(".")
            getattr(self, which)[key] = value.to(torch.float64).clone()
