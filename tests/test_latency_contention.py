"""A study's latency phase must not store timings taken while other processes used the CPUs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from prunekit.evaluate import cpuload
from prunekit.report.data import load
from prunekit.report.page import runs_table
from prunekit.study import build_study, latency
from prunekit.study.database import open_for_study
from prunekit.study.execute import RunContext
from prunekit.study.spec import Run

MACHINE = {"cpu": "test cpu", "cores": 2, "threads": 2, "memory_gib": 8.0, "gpu": None, "system": "Linux"}
VERSIONS = {"prunekit": "0.1.0", "torch": "2.13.0", "transformers": "5.0"}
SETTINGS = {"seq_len": 8, "batch_size": 1, "repeats": 2, "warmup": 0, "gen_tokens": 0}


class FakeProbe:
    """Probes whose stop() hands out the given shares in order (the last one repeats)."""

    def __init__(self, shares: list[float]) -> None:
        self.shares = shares
        self.used = 0

    def __call__(self) -> Any:
        def stop() -> float:
            share = self.shares[min(self.used, len(self.shares) - 1)]
            self.used += 1
            return share
        return SimpleNamespace(stop=stop)


def _study(folder: Path) -> tuple[Any, RunContext, Run, Run]:
    study = build_study({"name": "timing", "models": ["m"], "evaluation": {"data": ["text:a"]},
                         "methods": [{"method": "magnitude", "sparsity": 0.5}]},
                        "t.yaml", check_sources=False)
    database = open_for_study(folder, study)
    dense = Run("key-dense", "dense", "m", "causal-lm", "dense", "dense", {"kind": "dense"}, save=False)
    kept = Run("key-kept", "magnitude 50%", "m", "causal-lm", "magnitude", "one-shot", {"kind": "one-shot"})
    results = {"quality": {}, "size": {"prunable_params": 80, "prunable_nonzero": 80}, "bytes": {}}
    for run in (dense, kept):
        assert database.add_run(run, results, 1.0, MACHINE, VERSIONS)
    database.set_meta({"study_keys": json.dumps([dense.key, kept.key])})  # these rows are the study's runs
    context = RunContext(out=str(folder), evaluation={"latency": SETTINGS}, eval_sets={})
    return database, context, dense, kept


@pytest.fixture()
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """No real model or clock: load_model and compare_latency stand-ins; count of timings in the list."""
    calls: list[int] = []

    def compare(models: dict[str, Any], **_: Any) -> dict[str, Any]:
        calls.append(1)
        result = SimpleNamespace(forward_ms_median=10.0, forward_ratio=1.0, decode_ms_per_token=None,
                                 decode_ratio=None, rounds=2, device="cpu")
        return {name: result for name in models}

    monkeypatch.setattr("prunekit.evaluate.speed.compare_latency", compare)
    monkeypatch.setattr("prunekit.models.load_model", lambda *a, **k: (object(), None))
    monkeypatch.setattr(cpuload.time, "sleep", lambda seconds: None)
    return calls


def test_a_timing_waits_for_quiet_and_is_taken_again_when_others_used_the_cpus(
        tmp_path: Path, fake_timing: list[int]) -> None:
    database, context, _dense, _kept = _study(tmp_path / "s")
    said: list[str] = []
    # wait: busy then quiet; timing: contended (60 %); wait: quiet; timing: 5 % (fine)
    probe = FakeProbe([0.5, 0.0, 0.6, 0.0, 0.05])
    assert latency.time_runs(database, context, said.append, probe=probe) == 1  # only the dense run is at hand
    assert len(fake_timing) == 2
    row = next(r for r in database.runs() if r["key"] == "key-dense")
    assert row["latency"]["contended"] is False and row["latency"]["attempts"] == 2
    assert row["latency"]["other_cpu_share"] == pytest.approx(0.05)
    assert any("use 50% of the CPUs: waiting" in line for line in said)
    assert any("used 60% of the CPUs meanwhile: timing again" in line for line in said)
    database.close()


def test_a_timing_still_contended_is_marked_and_left_out_of_the_report(
        tmp_path: Path, fake_timing: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "MAX_WAIT_S", 0.0)
    database, context, _dense, _kept = _study(tmp_path / "s")
    said: list[str] = []
    latency.time_runs(database, context, said.append, probe=FakeProbe([0.9]))
    assert len(fake_timing) == latency.ATTEMPTS
    assert any(f"stored as contended after {latency.ATTEMPTS} tries" in line for line in said)
    database.close()
    data = load(tmp_path / "s")
    dense = next(e for e in data.entries if e.label == "dense")
    assert dense.contended and dense.forward_ratio is None and dense.forward_ms is None
    assert ">contended</td>" in runs_table(data)


def test_retime_drops_only_timings_whose_model_is_at_hand(tmp_path: Path) -> None:
    database, context, dense, kept = _study(tmp_path / "s")
    for run in (dense, kept):
        database.add_latency(run.key, {"forward_ratio": 1.0}, MACHINE)
    assert latency.forget_timings(database, context) == 1  # the kept run's folder is not there: keep its timing
    assert database.timed_keys() == {kept.key}
    database.close()


def test_other_load_counts_only_other_processes(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")

    def write(busy: int, idle: int) -> None:  # user nice system idle iowait irq softirq steal
        stat.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")

    write(1000, 5000)
    probe = cpuload.other_load(str(stat))
    probe.own = probe.own - 1.0  # as if this process had used 1 s of CPU since: hz ticks are its own
    write(1000 + 3 * hz, 5000 + hz)  # 4 s of CPU time passed over both CPUs, 3 s busy, 1 s of it ours
    assert probe.stop() == pytest.approx(0.5, abs=0.02)  # others: 2 of 4 s
    assert cpuload.other_load(str(tmp_path / "absent")).stop() is None
