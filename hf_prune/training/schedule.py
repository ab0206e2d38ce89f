"""`PruningSchedule`: when gradual pruning masks more, and how much of the final target is reached.

Every `PruningConfig` amount (heads, KV groups, neurons, branches, layers) is a *final* target.
A schedule gives, after `t` completed optimizer steps, the fraction `s_t / s_f` of those targets
in force; the callback rounds `fraction × final count` per kind, so the targets are met exactly
when the fraction reaches 1 (at `end_step`). Fractions only change at the schedule's events.

- `oneshot`: everything at `start_step`.
- `iterative`: the same share every `frequency` steps from `start_step` to `end_step` (linear).
- `cubic` (Zhu & Gupta 2017, "To prune, or not to prune"):
  `s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³`, with `t0 = start_step`, `nΔt = end_step − start_step`,
  `Δt = frequency`: prunes fast while the network is redundant, slowly near the target.

`initial_sparsity` (`s_i`) is the fraction of the targets already applied at `start_step`.

Method notes and sources: docs/methods.md §6.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal

from ..errors import InvalidScheduleError

ScheduleKind = Literal["oneshot", "iterative", "cubic"]

#: Where the default schedule ends, as a share of the run's optimizer steps: the targets are
#: reached with a quarter of the run left to recover from the last masks.
DEFAULT_END_SHARE = 0.75


@dataclass(frozen=True)
class PruningSchedule:
    """When to mask more. `end_step=None` means `DEFAULT_END_SHARE` of the run (resolved at train start)."""

    kind: ScheduleKind = "cubic"
    start_step: int = 0
    end_step: int | None = None
    frequency: int = 1
    initial_sparsity: float = 0.0

    KINDS: ClassVar[tuple[str, ...]] = ("oneshot", "iterative", "cubic")

    def __post_init__(self) -> None:
        if self.kind not in self.KINDS:
            raise InvalidScheduleError(f"kind={self.kind!r} is unknown; choose one of {', '.join(self.KINDS)}.")
        for name in ("start_step", "frequency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "frequency" else 0):
                raise InvalidScheduleError(f"{name}={value!r} must be an int >= {1 if name == 'frequency' else 0}.")
        if self.end_step is not None:
            if isinstance(self.end_step, bool) or not isinstance(self.end_step, int):
                raise InvalidScheduleError(f"end_step={self.end_step!r} must be an int or None (75% of the run).")
            if self.kind == "oneshot" and self.end_step != self.start_step:
                raise InvalidScheduleError(
                    f"end_step={self.end_step} with kind='oneshot': a one-shot schedule prunes once, at start_step "
                    f"({self.start_step}); leave end_step unset."
                )
            if self.kind != "oneshot" and self.end_step <= self.start_step:
                raise InvalidScheduleError(
                    f"end_step={self.end_step} must be greater than start_step={self.start_step}."
                )
        if (
            isinstance(self.initial_sparsity, bool)
            or not isinstance(self.initial_sparsity, (int, float))
            or not (0 <= self.initial_sparsity < 1)
        ):
            raise InvalidScheduleError(
                f"initial_sparsity={self.initial_sparsity!r} must be a fraction of the targets in [0, 1)."
            )

    def resolved(self, total_steps: int) -> PruningSchedule:
        """This schedule for a run of `total_steps` optimizer steps, with `end_step` filled in and checked."""
        end = self.start_step if self.kind == "oneshot" else self.end_step
        if end is None:
            end = int(DEFAULT_END_SHARE * total_steps)
            if end <= self.start_step:
                raise InvalidScheduleError(
                    f"the default end_step (75% of {total_steps} steps = {end}) is not after start_step="
                    f"{self.start_step}; train longer or pass PruningSchedule(end_step=...)."
                )
        if end > total_steps:
            raise InvalidScheduleError(
                f"end_step={end} is after the run's last optimizer step ({total_steps}): the targets would never "
                f"be reached. Pass end_step <= {total_steps} (or train for more steps)."
            )
        return replace(self, end_step=end)

    def _require_resolved(self) -> int:
        end = self.start_step if self.kind == "oneshot" else self.end_step
        if end is None:
            raise InvalidScheduleError("end_step is unset; call resolved(total_steps) first.")
        return end

    def events(self) -> list[int]:
        """The optimizer steps after which the masks may change (the last one reaches the targets)."""
        end = self._require_resolved()
        if self.kind == "oneshot":
            return [end]
        return sorted({*range(self.start_step, end, self.frequency), end})

    def fraction(self, step: int) -> float:
        """`s_t / s_f` in force after `step` completed optimizer steps (0 before the first event)."""
        end = self._require_resolved()
        passed = [event for event in self.events() if event <= step]
        if not passed:
            return 0.0
        t = passed[-1]
        if self.kind == "oneshot" or t >= end:
            return 1.0
        progress = (t - self.start_step) / (end - self.start_step)
        s_i = float(self.initial_sparsity)
        if self.kind == "iterative":
            return s_i + (1 - s_i) * progress
        return 1 + (s_i - 1) * (1 - progress) ** 3

    def to_dict(self) -> dict:
        return asdict(self)
