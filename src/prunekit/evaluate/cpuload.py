"""How much of the machine's CPU other processes used while we timed something (Linux; None elsewhere).

A latency measured while another process computes is wrong, and not by a little: on 2 cores, a forward
pass that takes 24 ms alone took 520 ms while a test suite ran beside it (both processes with 2
threads). Timing code calls :func:`other_load` around its measurement and times again, or marks the
figure as contended, when others used more than a small share.

The share is (CPU time the whole machine spent busy - CPU time this process spent) / (wall time x CPUs),
from ``/proc/stat`` and :func:`os.times`, so it is 0 on an idle machine and 0.5 when another process
kept one of two cores busy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

STAT = "/proc/stat"
QUIET = 0.10  # others below this share: the machine counts as idle
CONTENDED = 0.15  # others above this share during a timing: the timing is contended


def _machine_ticks(path: str = STAT) -> tuple[int, int] | None:
    """(busy, total) clock ticks of all CPUs since boot, or None where /proc/stat is not there."""
    try:
        with open(path, encoding="ascii") as handle:
            fields = handle.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal (guest is in user)
    idle = values[3] + values[4]
    total = sum(values)
    return total - idle, total


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class LoadProbe:
    """Started by :func:`other_load`; :meth:`stop` gives the others' share of the CPUs since, or None."""

    ticks: tuple[int, int] | None
    own: float
    path: str = STAT

    def stop(self) -> float | None:
        now = _machine_ticks(self.path)
        if self.ticks is None or now is None:
            return None
        busy, total = now[0] - self.ticks[0], now[1] - self.ticks[1]
        if total <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        own = (_own_seconds() - self.own) * hz
        return min(1.0, max(0.0, (busy - own) / total))


def other_load(path: str = STAT) -> LoadProbe:
    """Start measuring the other processes' share of the CPUs (see the module docstring)."""
    return LoadProbe(_machine_ticks(path), _own_seconds(), path)


def wait_until_quiet(max_wait_s: float, say: Callable[[str], None], *, probe: Callable[[], LoadProbe] = other_load,
                     window_s: float = 1.0, quiet: float = QUIET) -> float | None:
    """Sample the others' share in ``window_s`` windows until it is below ``quiet`` or ``max_wait_s`` passed.

    Says once that it waits. Returns the last share seen (None where it cannot be measured: no wait).
    """
    started = time.monotonic()
    said = False
    while True:
        sample = probe()
        time.sleep(window_s)
        share = sample.stop()
        if share is None or share < quiet:
            return share
        waited = time.monotonic() - started
        if waited >= max_wait_s:
            say(f"other processes still use {share:.0%} of the CPUs after {waited:.0f} s: timing anyway "
                "(the figure will be marked if it is contended)")
            return share
        if not said:
            say(f"other processes use {share:.0%} of the CPUs: waiting up to {max_wait_s:.0f} s for them to finish "
                "before timing")
            said = True
