"""The cubic sparsity schedule: values at known steps (computed by hand), update steps, validation."""

from __future__ import annotations

import pytest

from prunekit.errors import PrunekitError
from prunekit.methods.schedule import CubicSchedule, resolve_steps


def test_values_at_known_steps() -> None:
    # T=100, t_i=10, t_f=20 -> t_e=80; s(t) = 0.8 - 0.8 * (1 - (t - 10)/70)^3
    schedule = CubicSchedule(total_steps=100, final_sparsity=0.8, warmup_steps=10, final_steps=20, update_every=10)
    assert schedule.end_step == 80
    assert schedule.sparsity(0) == 0.0
    assert schedule.sparsity(9) == 0.0
    assert schedule.sparsity(10) == pytest.approx(0.0)
    assert schedule.sparsity(45) == pytest.approx(0.7)  # (1 - 35/70)^3 = 1/8 -> 0.8 - 0.1
    assert schedule.sparsity(24) == pytest.approx(0.8 - 0.8 * 0.8 ** 3)  # (1 - 14/70) = 0.8 -> 0.3904
    assert schedule.sparsity(24) == pytest.approx(0.3904)
    assert schedule.sparsity(80) == 0.8
    assert schedule.sparsity(100) == 0.8


def test_values_with_initial_sparsity() -> None:
    # the authors' 0.3 -> 0.9 with no warm-up: s(5) = 0.9 + (0.3 - 0.9) * (1 - 5/10)^3 = 0.825
    schedule = CubicSchedule(total_steps=10, final_sparsity=0.9, initial_sparsity=0.3)
    assert schedule.sparsity(0) == pytest.approx(0.3)
    assert schedule.sparsity(5) == pytest.approx(0.825)
    assert schedule.sparsity(10) == pytest.approx(0.9)


def test_sparsity_never_decreases() -> None:
    schedule = CubicSchedule(total_steps=57, final_sparsity=0.9, initial_sparsity=0.1, warmup_steps=7, final_steps=11)
    values = [schedule.sparsity(t) for t in range(60)]
    assert all(b >= a for a, b in zip(values, values[1:], strict=False))


def test_update_steps_and_freeze() -> None:
    schedule = CubicSchedule(total_steps=100, final_sparsity=0.8, warmup_steps=10, final_steps=20, update_every=30)
    updates = [t for t in range(0, 101) if schedule.is_update(t)]
    assert updates == [10, 40, 70, 80]  # every Δt from t_i, and once at t_e
    assert not schedule.is_frozen(79) and schedule.is_frozen(80) and schedule.is_frozen(100)


def test_progress() -> None:
    schedule = CubicSchedule(total_steps=100, final_sparsity=0.5, warmup_steps=10, final_steps=20)
    assert schedule.progress(0) == 0.0
    assert schedule.progress(45) == pytest.approx(0.5)
    assert schedule.progress(95) == 1.0


@pytest.mark.parametrize("kwargs, words", [
    ({"final_sparsity": 1.0}, "outside [0, 1)"),
    ({"final_sparsity": -0.1}, "outside [0, 1)"),
    ({"final_sparsity": 0.5, "initial_sparsity": 0.6}, "above --sparsity"),
    ({"final_sparsity": 0.5, "warmup_steps": 60, "final_steps": 40}, "do not fit"),
    ({"final_sparsity": 0.5, "warmup_steps": 200}, "do not fit"),
    ({"final_sparsity": 0.5, "update_every": 0}, "at least 1"),
])
def test_bad_schedules(kwargs: dict, words: str) -> None:
    with pytest.raises(PrunekitError, match=words.replace("[", r"\[").replace(")", r"\)")):
        CubicSchedule(total_steps=100, **kwargs)


def test_resolve_steps() -> None:
    assert resolve_steps(None, 200, 0.1) == 20
    assert resolve_steps(0.25, 200, 0.1) == 50
    assert resolve_steps(30, 200, 0.1) == 30
    assert resolve_steps(0, 200, 0.1) == 0
