"""`GradualSchedule`: when a training run prunes and how much, the cubic schedule of Zhu & Gupta (2017).

With the run's final targets given by a `PruningConfig`, the share of them reached at step `t` is
`1 − (1 − (t − start_step) / (end_step − start_step))^exponent`, applied every `every_n_steps`
steps from `start_step` to `end_step`: fast at first, while the network has slack, and slowly
near the end. `exponent=3` is the paper's cubic; `1` is linear.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import InvalidPruningTargetError


@dataclass(frozen=True)
class GradualSchedule:
    start_step: int = field(default=0, metadata={"help": "First optimizer step that prunes."})
    end_step: int = field(default=1000, metadata={"help": "Step at which the final targets are reached."})
    every_n_steps: int = field(default=100, metadata={"help": "Prune every this many steps in between."})
    exponent: int = field(default=3, metadata={"help": "3: cubic (Zhu & Gupta); 1: linear."})

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidPruningTargetError(f"{name}={value!r} must be an int.")
        if self.start_step < 0 or self.end_step <= self.start_step:
            raise InvalidPruningTargetError(
                f"need 0 <= start_step < end_step, got start_step={self.start_step}, end_step={self.end_step}."
            )
        if not 0 < self.every_n_steps <= self.end_step - self.start_step:
            raise InvalidPruningTargetError(
                f"every_n_steps={self.every_n_steps} must lie in [1, end_step - start_step = {self.end_step - self.start_step}]."
            )
        if self.exponent < 1:
            raise InvalidPruningTargetError(f"exponent={self.exponent} must be >= 1 (3: cubic, 1: linear).")

    def pruning_steps(self) -> list[int]:
        """The steps that prune; the last is always `end_step`."""
        steps = list(range(self.start_step, self.end_step, self.every_n_steps))
        return steps[1:] + [self.end_step] if steps else [self.end_step]

    def share_at(self, step: int) -> float:
        """Share of the final targets reached once `step` has run (0 before the first pruning step)."""
        done = [s for s in self.pruning_steps() if s <= step]
        if not done:
            return 0.0
        progress = (done[-1] - self.start_step) / (self.end_step - self.start_step)
        return 1 - (1 - progress) ** self.exponent
