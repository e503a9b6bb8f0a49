"""The cubic sparsity schedule of gradual pruning (Zhu & Gupta 2017), shared by gmp, movement and mgpp.

Steps are counted as optimiser steps *completed* (``t = 1`` after the first step). With ``T`` total
steps, ``t_i`` warm-up steps, ``t_f`` final steps and ``t_e = T - t_f``::

    s(t) = 0                                                  t < t_i
    s(t) = s_f + (s_i - s_f) * (1 - (t - t_i) / (t_e - t_i))**3   t_i <= t < t_e  (mask every Δt steps)
    s(t) = s_f, the mask frozen                               t >= t_e
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class CubicSchedule:
    """Target sparsity per step; ``update_every`` (Δt) spaces the mask updates between t_i and t_e."""

    total_steps: int
    final_sparsity: float
    initial_sparsity: float = 0.0
    warmup_steps: int = 0
    final_steps: int = 0
    update_every: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def end_step(self) -> int:
        """t_e = T - t_f: the step from which the mask is frozen at the final sparsity."""
        return self.total_steps - self.final_steps

    def validate(self) -> None:
        """Raise a one-line PrunekitError for a schedule that cannot run."""
        for label, value in (("--sparsity", self.final_sparsity), ("--initial-sparsity", self.initial_sparsity)):
            if not 0.0 <= value < 1.0:
                raise PrunekitError(f"{label} {value} is outside [0, 1): give a fraction such as 0.9")
        if self.initial_sparsity > self.final_sparsity:
            raise PrunekitError(f"--initial-sparsity {self.initial_sparsity} is above --sparsity {self.final_sparsity}:"
                                " the schedule only prunes more over time")
        if self.total_steps < 1:
            raise PrunekitError(f"the run has {self.total_steps} optimiser steps: give more data, epochs or "
                                "--max-steps")
        if self.warmup_steps < 0 or self.final_steps < 0:
            raise PrunekitError("--warmup-steps and --final-steps must be 0 or more")
        if self.update_every < 1:
            raise PrunekitError(f"--update-every {self.update_every} must be at least 1 step")
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise PrunekitError(
                f"warm-up ({self.warmup_steps}) plus final steps ({self.final_steps}) do not fit in the run's "
                f"{self.total_steps} optimiser steps: lower --warmup-steps/--final-steps or train longer")

    def sparsity(self, step: int) -> float:
        """Target sparsity after ``step`` completed optimiser steps."""
        if step < self.warmup_steps:
            return 0.0
        if step >= self.end_step:
            return self.final_sparsity
        remaining = 1.0 - (step - self.warmup_steps) / (self.end_step - self.warmup_steps)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * remaining ** 3

    def progress(self, step: int) -> float:
        """How far the pruning phase is, in [0, 1]: 0 before t_i, 1 from t_e on."""
        span = max(1, self.end_step - self.warmup_steps)
        return min(1.0, max(0.0, (step - self.warmup_steps) / span))

    def is_update(self, step: int) -> bool:
        """True when the mask is recomputed after ``step`` completed steps (t_i, t_i + Δt, ..., and t_e)."""
        if step < self.warmup_steps or step > self.end_step:
            return False
        return step == self.end_step or (step - self.warmup_steps) % self.update_every == 0

    def is_frozen(self, step: int) -> bool:
        """True once the final mask is fixed (t >= t_e)."""
        return step >= self.end_step

    def describe(self) -> dict[str, Any]:
        """The schedule's settings, for records and printing."""
        return {**asdict(self), "end_step": self.end_step, "shape": "cubic"}


def resolve_steps(value: int | float | None, total_steps: int, default_fraction: float) -> int:
    """A step count from an int, a fraction of the run (0 < x < 1 as float), or None (the default fraction)."""
    if value is None:
        return int(round(default_fraction * total_steps))
    if isinstance(value, float) and 0.0 < value < 1.0:
        return int(round(value * total_steps))
    return int(value)


def steps_setting(value: int | float | None, name: str = "step count") -> int | float | None:
    """A step setting as given by a user: whole numbers as int, fractions in (0, 1) as float, None stays None."""
    if value is None:
        return None
    number = float(value)
    if 0.0 < number < 1.0:
        return number
    if number < 0 or not number.is_integer():
        raise PrunekitError(f"{name} {value} must be a whole number of steps or a fraction in (0, 1)")
    return int(number)
