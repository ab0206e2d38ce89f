"""L0 / hard-concrete gates (Louizos et al. 2018) on heads and MLP neurons, learned with the task loss.

The opt-in `score="l0"` of `PruningCallback` (as CoFi and Sheared-LLaMA use it for structured LM
pruning). Every gated unit (a query head, an MLP neuron) has a learnable `log_alpha`; a forward
pre-hook on its consumer projection (`o_proj`, `down_proj`, GPT-2 `c_proj`, ... read generically
from the adapter's consumer `TensorSlice`s) multiplies the unit's input features by a gate `z`:

- training mode: `z = clamp(sigmoid((log u − log(1 − u) + log_alpha) / β) (ζ − γ) + γ, 0, 1)`,
  `u ~ U(0, 1)`, one sample per gate and forward (shared by the batch);
- eval mode: the deterministic `z = clamp(sigmoid(log_alpha) (ζ − γ) + γ, 0, 1)`.

`P(z ≠ 0) = sigmoid(log_alpha − β log(−γ/ζ))` is differentiable, so the expected kept fraction
per kind is what the penalty (`LagrangianPenalty`) pulls toward the target.

The gates act exactly where masking acts, so masked units (zero consumer columns) contribute zero
whatever their gate. Pruning decisions are not taken by thresholding gates: at the schedule's events
the callback ranks groups by `log_alpha` and masks with the engine's semantics like every other score.
At compaction the deterministic gates are folded into the consumer columns (and LoRA `A` columns), then
the gates are detached, so the cut model computes what the gated, masked model computes in eval mode.

Adam moves a parameter by about the learning rate per step whatever its gradient's scale, and a
fine-tuning learning rate (1e-5 .. 1e-4) would barely move a log-alpha. The gates therefore store
`log_alpha / lr_scale` as the parameter: the Trainer's own optimizer then moves `log_alpha`
about `lr_scale ×` the learning rate per step, without a custom optimizer.

Method notes and sources: docs/methods.md §6.3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import UsageError
from ..groups import ArchitectureAdapter, Group, GroupKind
from ..groups.base import in_features
from ..plan import PruningPlan

#: Name of the gates' submodule on the model they gate.
GATES_ATTRIBUTE = "hf_prune_gates"
#: The kinds that carry gates; KV groups are ranked from the gates of their query heads.
GATED_KINDS: tuple[GroupKind, ...] = ("heads", "neurons")


@dataclass(frozen=True)
class L0Settings:
    """Hyperparameters of the hard-concrete gates and their Lagrangian penalty.

    Args:
        initial_log_alpha: every gate's starting `log_alpha`; 3.0 keeps the eval gates at exactly 1
            (`sigmoid(3)·1.2 − 0.1 > 1`), so attaching the gates does not change the pretrained model. The
            price: about 97% of the training samples then clamp at 1, where the task loss has no gradient,
            so the task signal reaches a gate only through its unclamped samples until the penalty lowers
            `log_alpha`; a lower start (0 gives samples inside (0, 1) half the time) trades that for a
            changed model at attach time.
        temperature: β of the hard-concrete distribution (Louizos et al.: 2/3).
        stretch: (γ, ζ), the interval the concrete sample is stretched to before clamping to [0, 1].
        lr_scale: `log_alpha` moves `lr_scale ×` the Trainer's learning rate per Adam step.
        multiplier_lr: step size of the dual ascent on the Lagrange multipliers, per optimizer step.
    """

    initial_log_alpha: float = 3.0
    temperature: float = 2 / 3
    stretch: tuple[float, float] = (-0.1, 1.1)
    lr_scale: float = 100.0
    multiplier_lr: float = 1.0

    def __post_init__(self):
        low, high = self.stretch
        if not (low < 0 and high > 1):
            raise UsageError(f"L0Settings(stretch={self.stretch}) must satisfy γ < 0 < 1 < ζ, e.g. (-0.1, 1.1).")
        if self.temperature <= 0 or self.lr_scale <= 0 or self.multiplier_lr <= 0:
            raise UsageError("L0Settings(temperature, lr_scale, multiplier_lr) must all be positive.")


class HardConcreteGates(nn.Module):
    """One `log_alpha` per gated unit and the pre-hooks that apply the gates on the consumer inputs."""

    def __init__(
        self, model: nn.Module, adapter: ArchitectureAdapter, kinds: tuple[GroupKind, ...], settings: L0Settings
    ):
        super().__init__()
        unknown = set(kinds) - set(GATED_KINDS)
        if unknown:
            raise UsageError(
                f"hard-concrete gates exist for {', '.join(GATED_KINDS)}, not {', '.join(sorted(unknown))}."
            )
        self.settings = settings
        self.parameters_by_key = nn.ParameterDict()
        self._consumers: dict[str, tuple[str, int]] = {}  # key → (consumer module, its weight's input dim)
        self._feature_gates: dict[str, torch.Tensor] = {}  # key → gate of every input feature (len(units): constant 1)
        self._removed: dict[str, torch.Tensor] = {}  # key → masked units (they count as closed)
        self._handles: list[RemovableHandle] = []
        for index, layer in enumerate(adapter.layers(model)):
            for kind in kinds:
                groups = adapter.groups(layer, index, kind)
                if not groups:
                    continue
                key = _key(kind, index)
                name, dim, feature_gates = _consumer_features(layer, groups)
                self._consumers[key] = (name, dim)
                self._feature_gates[key] = feature_gates
                self._removed[key] = torch.zeros(len(groups), dtype=torch.bool)
                start = settings.initial_log_alpha / settings.lr_scale
                self.parameters_by_key[key] = nn.Parameter(torch.full((len(groups),), start))
        self.kinds = tuple(kind for kind in kinds if any(key.startswith(kind + "_") for key in self._consumers))
        device = next(model.parameters()).device
        self.to(device)
        for index, layer in enumerate(adapter.layers(model)):
            for kind in self.kinds:
                key = _key(kind, index)
                if key in self._consumers:
                    module = layer.get_submodule(self._consumers[key][0])
                    self._handles.append(module.register_forward_pre_hook(self._gate_hook(key)))

    # ------------------------------------------------------------------ gates
    def log_alpha(self, key: str) -> torch.Tensor:
        return self.parameters_by_key[key] * self.settings.lr_scale

    def open_probability(self, key: str) -> torch.Tensor:
        """`P(z ≠ 0)` per unit: the expected L0 norm's terms."""
        low, high = self.settings.stretch
        return torch.sigmoid(self.log_alpha(key) - self.settings.temperature * math.log(-low / high))

    def gates(self, key: str) -> torch.Tensor:
        """A sample in training mode, the deterministic gate in eval mode."""
        low, high = self.settings.stretch
        log_alpha = self.log_alpha(key)
        if self.training:
            u = torch.rand_like(log_alpha).clamp(1e-6, 1 - 1e-6)
            concrete = torch.sigmoid((u.log() - (-u).log1p() + log_alpha) / self.settings.temperature)
        else:
            concrete = torch.sigmoid(log_alpha)
        return (concrete * (high - low) + low).clamp(0, 1)

    def _feature_scale(self, key: str) -> torch.Tensor:
        """The gate of every input feature of the consumer (1 for features no gate covers)."""
        sampled = self.gates(key)
        gates = torch.cat([sampled, sampled.new_ones(1)])
        return gates[self._feature_gates[key].to(gates.device)]

    def _gate_hook(self, key: str):
        def hook(module: nn.Module, args: tuple):
            scale = self._feature_scale(key)
            return (args[0] * scale.to(args[0].dtype), *args[1:])

        return hook

    # ------------------------------------------------------------------ penalty and ranking
    def expected_kept(self) -> dict[GroupKind, torch.Tensor]:
        """Per kind, the expected fraction of units whose gate is open; masked units count as closed."""
        kept: dict[GroupKind, torch.Tensor] = {}
        for kind in self.kinds:
            keys = [key for key in self._consumers if key.startswith(kind + "_")]
            total = sum(len(self._removed[key]) for key in keys)
            open_units = sum(
                (self.open_probability(key) * ~self._removed[key].to(self.parameters_by_key[key].device)).sum()
                for key in keys
            )
            kept[kind] = open_units / total
        return kept

    def set_removed(self, plan: PruningPlan) -> None:
        """Mark the units `plan` masks: they count as closed in `expected_kept`."""
        for key, removed in self._removed.items():
            kind, _, layer = key.rpartition("_")
            layer_plan = plan.layers[int(layer)]
            kept = layer_plan.query_heads if kind == "heads" else layer_plan.neurons
            branch_kept = layer_plan.keep_layer and (
                layer_plan.keep_attention if kind == "heads" else layer_plan.keep_mlp
            )
            removed.fill_(True)
            if branch_kept:
                removed[list(kept)] = False

    def score(self, model: nn.Module, adapter: ArchitectureAdapter, groups: list[Group]) -> torch.Tensor:
        """A `gradual.ScoreFunction`: `log_alpha` for gated kinds; for a group spanning several gates
        (a KV group and its query heads), the expected number of its open gates."""
        kind, layer = groups[0].kind, groups[0].layer
        if kind in self.kinds:
            return self.log_alpha(_key(kind, layer)).detach().to(torch.float64).cpu()
        key = _key("heads", layer)
        if kind != "kv_groups" or key not in self._consumers:
            raise UsageError(f"score='l0' cannot rank {kind}: only heads, KV groups and MLP neurons carry gates.")
        probability = self.open_probability(key).detach().to(torch.float64).cpu()
        feature_gates = self._feature_gates[key]
        scores = []
        for group in groups:
            columns = torch.cat([feature_gates[piece.start : piece.stop] for piece in group.slices if piece.consumer])
            scores.append(probability[columns[columns < len(probability)].unique()].sum())
        return torch.stack(scores)

    # ------------------------------------------------------------------ compaction
    @torch.no_grad()
    def fold_into(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        """Multiply the consumer columns (and LoRA `A` columns) by the deterministic gates."""
        was_training = self.training
        self.eval()
        layers = adapter.layers(model)
        for key, (name, dim) in self._consumers.items():
            module = layers[int(key.rpartition("_")[2])].get_submodule(name)
            scale = self._feature_scale(key)
            weight = getattr(module, "base_layer", module).weight
            shape = [1, 1]
            shape[dim] = -1
            weight.mul_(scale.to(weight).reshape(shape))
            for projection in getattr(module, "lora_A", {}).values():
                projection.weight.mul_(scale.to(projection.weight).reshape(1, -1))
        self.train(was_training)

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _key(kind: GroupKind, layer: int) -> str:
    return f"{kind}_{layer}"


def _consumer_features(layer: nn.Module, groups: list[Group]) -> tuple[str, int, torch.Tensor]:
    """The one module consuming the groups' outputs, its weight's input-feature dim, and the group index
    of each of its input features."""
    pieces = [piece for group in groups for piece in group.slices if piece.consumer]
    names = {piece.parameter.rpartition(".")[0] for piece in pieces}
    if len(names) != 1:
        raise UsageError(
            f"{groups[0].kind} of layer {groups[0].layer} are consumed by {sorted(names)}; gates need one module."
        )
    name = names.pop()
    feature_gates = torch.full((in_features(layer.get_submodule(name)),), -1, dtype=torch.long)
    for group in groups:
        for piece in group.slices:
            if piece.consumer:
                feature_gates[piece.start : piece.stop] = group.index
    feature_gates[feature_gates < 0] = len(groups)  # the constant-1 gate appended by `_feature_scale`
    return name, pieces[0].dim, feature_gates


def find_gates(model: nn.Module) -> HardConcreteGates | None:
    """The gates attached to `model` (also inside wrappers such as a `PeftModel`), if any."""
    return next((module for module in model.modules() if isinstance(module, HardConcreteGates)), None)


def attach_gates(
    model: nn.Module, adapter: ArchitectureAdapter, kinds: tuple[GroupKind, ...], settings: L0Settings
) -> HardConcreteGates:
    """Register gates as `model.hf_prune_gates` (their parameters join the model's, hence the optimizer's)."""
    if find_gates(model) is not None:
        raise UsageError("this model already has hard-concrete gates attached; attach them once per model.")
    gates = HardConcreteGates(model, adapter, kinds, settings)
    model.add_module(GATES_ATTRIBUTE, gates)
    return gates


def detach_gates(model: nn.Module) -> None:
    """Remove the gates' hooks and submodule: the model's state holds no gate tensors afterwards."""
    for name, module in list(model.named_modules()):
        if isinstance(module, HardConcreteGates):
            module.remove_hooks()
            parent_name, _, attribute = name.rpartition(".")
            delattr(model.get_submodule(parent_name), attribute)


class LagrangianPenalty:
    """CoFi's Lagrangian on the expected kept fraction `e` of each kind against its target `t`:
    `λ₁ (e − t) + λ₂ (e − t)²`, minimised by the model and gates, maximised by the multipliers.

    The multipliers take a plain dual-ascent step per optimizer step (`λ₁ += η·(e − t)`,
    `λ₂ += η·(e − t)²`, averaged over the step's training forwards): the pressure builds up while
    the gates miss the target and relaxes when they overshoot. `e` depends on the gates only, so
    every process of a multi-process run takes the same step.
    """

    def __init__(self, targets: dict[GroupKind, float], step_size: float):
        self.targets = dict(targets)
        self.step_size = step_size
        self.multipliers: dict[GroupKind, list[float]] = {kind: [0.0, 0.0] for kind in targets}
        self._violations: dict[GroupKind, list[float]] = {kind: [] for kind in targets}
        #: The latest expected kept fraction per kind (for logs and tests).
        self.expected: dict[GroupKind, float] = {}

    def penalty(self, expected: dict[GroupKind, torch.Tensor]) -> torch.Tensor:
        total = 0.0
        for kind, target in self.targets.items():
            violation = expected[kind] - target
            first, second = self.multipliers[kind]
            total = total + first * violation + second * violation**2
            self._violations[kind].append(float(violation.detach()))
            self.expected[kind] = float(expected[kind].detach())
        return total

    def step(self) -> None:
        for kind, violations in self._violations.items():
            if violations:
                mean = sum(violations) / len(violations)
                self.multipliers[kind][0] += self.step_size * mean
                self.multipliers[kind][1] += self.step_size * mean**2
                violations.clear()

    def state_dict(self) -> dict:
        return {"multipliers": self.multipliers, "expected": self.expected}

    def load_state_dict(self, state: dict) -> None:
        self.multipliers = {kind: list(values) for kind, values in state["multipliers"].items()}
        self.expected = dict(state["expected"])
