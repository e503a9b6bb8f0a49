"""A study killed with SIGKILL midway resumes with every run exactly once; worker processes and Ray run studies too."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from prunekit.errors import PrunekitError
from prunekit.study import build_study, open_existing, run_study
from prunekit.study.database import DB_NAME

TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want " \
       "of a wife. The quick brown fox jumps over the lazy dog.\n"


def study_file(folder: Path, model_dir: Path, **changes: Any) -> Path:
    text = folder / "text.txt"
    text.write_text(TEXT * 60)
    study: dict[str, Any] = {
        "name": "resume", "models": [str(model_dir)],
        "calibration": {"data": f"text:{text}", "samples": 2, "seq_len": 16},
        "evaluation": {"data": [f"text:{text}"], "tokens": 256, "seq_len": 16,
                       "latency": {"seq_len": 8, "repeats": 1, "warmup": 0, "gen_tokens": 2}},
        "methods": [{"method": "magnitude", "sparsity": [0.3, 0.5]}, {"method": "wanda", "structure": "2:4"},
                    {"method": "heads-neurons", "ratio": 0.25}],
        "recovery": {"data": f"text:{text}", "budgets": [64], "methods": ["magnitude"], "dense": False,
                     "batch_size": 2, "seq_len": 16},
    }
    study.update(changes)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def row_keys(database: Path) -> list[str]:
    if not database.exists():
        return []
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return [key for (key,) in connection.execute("SELECT key FROM runs")]
    except sqlite3.OperationalError:  # created but its tables not yet visible
        return []


def run_until(command: list[str], stop: Callable[[], bool], log: Path, limit: float = 120) -> bool:
    """Run ``command``; SIGKILL it as soon as ``stop()`` holds. True if it was killed, False if it ended first."""
    with log.open("a") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=handle)
        deadline = time.monotonic() + limit
        while process.poll() is None and time.monotonic() < deadline:
            if stop():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.01)
        if process.poll() is None:  # pragma: no cover - a hung study
            process.kill()
            raise AssertionError(f"the study did not finish in {limit} s: see {log}")
        return False


def test_a_study_killed_midway_resumes_with_every_run_once(tmp_path: Path, tiny_llama_dir: Path) -> None:
    path = study_file(tmp_path, tiny_llama_dir)
    total = len(build_study(yaml.safe_load(path.read_text()), "s").runs)
    out = tmp_path / "out"
    database = out / DB_NAME
    command = [sys.executable, "-m", "prunekit.cli.main", "study", str(path), "--out", str(out), "--no-progress",
               "--no-report"]
    log = tmp_path / "log.txt"
    # first kill: as soon as the first run's row is in; second: while a model folder is being written (or, if that
    # moment is missed, as soon as one more row is in)
    assert run_until(command, lambda: len(row_keys(database)) >= 1, log), log.read_text()
    first = row_keys(database)
    assert 1 <= len(first) < total
    models = out / "models"

    def writing_a_model_or_one_more_row() -> bool:
        writing = models.is_dir() and any(".tmp-" in p.name for p in models.iterdir())
        return writing or len(row_keys(database)) > len(first)

    assert run_until(command, writing_a_model_or_one_more_row, log), log.read_text()
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    second = row_keys(database)
    assert len(second) == len(set(second)) < total and set(first) <= set(second)
    for folder in models.iterdir():  # every model folder is complete or a temporary one
        complete = (folder / "prunekit.json").is_file() and (folder / "config.json").is_file()
        assert folder.name.startswith(".") or complete
    # the same command finishes the study: every run exactly once, every model complete, no leftovers
    assert not run_until(command, lambda: False, log), log.read_text()
    keys = row_keys(database)
    assert len(keys) == len(set(keys)) == total
    found = open_existing(out)
    rows = found.runs()
    found.close()
    assert all("latency" in row for row in rows)
    for row in rows:
        if row["folder"]:
            assert (out / row["folder"] / "prunekit.json").is_file()
    assert not [p for p in models.iterdir() if p.name.startswith(".")]


def test_worker_processes_share_the_cores_and_log_each_run(tmp_path: Path, tiny_llama_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import prunekit.study.executors as executors

    monkeypatch.setattr(executors.os, "cpu_count", lambda: 4)
    path = study_file(tmp_path, tiny_llama_dir, methods=[{"method": "magnitude", "sparsity": [0.3, 0.5]}],
                      recovery=None)
    study = build_study(yaml.safe_load(path.read_text()), "s")
    lines: list[str] = []
    outcome = run_study(study, tmp_path / "out", workers=2, echo=lines.append)
    assert not outcome.failed and len(outcome.finished) == 3 and outcome.timed == 3
    found = open_existing(tmp_path / "out")
    rows = found.runs()
    found.close()
    assert {row["machine"]["threads"] for row in rows} == {2}  # 4 cores / 2 workers
    assert len(list((tmp_path / "out" / "logs").glob("*.log"))) == 3
    assert any("started in a worker" in line for line in lines)


def test_ray_runs_a_study_on_a_local_instance(tmp_path: Path, tiny_llama_dir: Path) -> None:
    pytest.importorskip("ray", reason="Ray is not installed: pip install 'prunekit[ray]'")
    path = study_file(tmp_path, tiny_llama_dir, methods=[{"method": "magnitude", "sparsity": 0.5}], recovery=None,
                      evaluation=None)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"] = {"data": raw["calibration"]["data"], "tokens": 128, "seq_len": 16, "latency": False}
    study = build_study(raw, "s")
    outcome = run_study(study, tmp_path / "out", workers=2, executor="ray", echo=lambda line: None)
    assert not outcome.failed and len(outcome.finished) == 2
    found = open_existing(tmp_path / "out")
    assert {row["label"] for row in found.runs()} == {"dense", "magnitude 50%"}
    found.close()


def test_ray_missing_is_a_one_line_error_naming_the_extra(tmp_path: Path, tiny_llama_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    path = study_file(tmp_path, tiny_llama_dir, methods=[{"method": "magnitude", "sparsity": 0.5}], recovery=None)
    study = build_study(yaml.safe_load(path.read_text()), "s")
    with pytest.raises(PrunekitError, match=r"--executor ray needs Ray, which is not installed: pip install "
                                            r"'prunekit\[ray\]'"):
        run_study(study, tmp_path / "out", executor="ray", echo=lambda line: None)
