"""Running a study: open (or create) its results database, run what is missing, then time it.

1. The study folder is locked (one invocation at a time) and its database checked: a new or empty
   folder gets a new database; a folder holding another study, a damaged database or one from a newer
   prunekit is refused before anything changes.
2. Leftovers of an interrupted invocation (temporary model folders) are removed; runs whose row is in
   the database are skipped. The others run on the executor, a recovery run once its pruned run is in;
   each finished run's row is committed in one transaction. A run that fails is logged and tried
   again next time; the runs that depend on it wait.
3. Latency phase (:mod:`prunekit.study.latency`): finished runs are timed against their dense model
   with no other run active.

``prunekit study`` then writes the report (:mod:`prunekit.report`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.study.database import LOCK_NAME, ResultsDatabase, open_for_study
from prunekit.study.execute import RunContext, RunOutcome
from prunekit.study.executors import core_share, make_executor
from prunekit.study.latency import forget_timings, time_runs
from prunekit.study.spec import Run, Study


@dataclass
class StudyOutcome:
    """What an invocation did."""

    folder: Path
    total: int
    done_before: int
    finished: list[str] = field(default_factory=list)  # labels of the runs finished now
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, error)
    blocked: list[str] = field(default_factory=list)  # waiting for a run that failed
    timed: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's lock file: a second invocation on the same folder is refused (released on any exit)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    created = not path.exists()
    handle = path.open("a")
    refused = False
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrunekitError(f"another prunekit study is running in '{folder}': wait for it to finish (or stop "
                                "it), then run again") from None
        try:
            yield
        except PrunekitError:
            refused = True
            raise
    finally:
        handle.close()
        if refused and created:
            path.unlink(missing_ok=True)  # a refused folder is left as it was found


def remove_leftovers(folder: Path) -> list[str]:
    """Temporary folders and files an interrupted invocation left (never a complete model or a checkpoint)."""
    removed = []
    for parent in (folder, folder / "models", folder / "work"):
        if not parent.is_dir():
            continue
        for path in parent.iterdir():
            temporary = path.name.startswith(".") and (".tmp-" in path.name or ".old-" in path.name)
            export = parent.name == "work" and not path.name.endswith(".checkpoints")
            if temporary or export:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(str(path.relative_to(folder)))
    return removed


def run_study(study: Study, out: str | Path, *, workers: int = 1, executor: str = "local",
              address: str | None = None, progress: bool = True, echo: Callable[[str], None] = print,
              retime: bool = False) -> StudyOutcome:
    """Run every run of ``study`` that is not in ``out``'s database yet, then the latency phase.

    ``retime`` drops the timings of every run whose model is at hand first, so they are all timed again.
    """
    folder = Path(out).absolute()
    if folder.exists() and not folder.is_dir():
        raise PrunekitError(f"output path '{out}' is a file, not a folder: choose another --out")
    started = time.perf_counter()
    existed = folder.exists()
    try:
        with study_lock(folder):
            database = open_for_study(folder, study)
            try:
                return _run(study, database, folder, workers, executor, address, progress, echo, started, retime)
            finally:
                database.close()
    except PrunekitError:
        if not existed and folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_NAME}:
            shutil.rmtree(folder, ignore_errors=True)  # refused before anything ran: leave no empty folder behind
        raise


def _run(study: Study, database: ResultsDatabase, folder: Path, workers: int, executor_kind: str,
         address: str | None, progress: bool, echo: Callable[[str], None], started: float,
         retime: bool = False) -> StudyOutcome:
    remove_leftovers(folder)
    done = database.done_keys()
    todo = [run for run in study.runs if run.key not in done]
    outcome = StudyOutcome(folder, len(study.runs), len(study.runs) - len(todo))
    echo(f"study {study.name}: {outcome.total} runs, {outcome.done_before} done before, {len(todo)} to do "
         f"-> {folder}")
    inline = executor_kind == "local" and workers == 1
    context = RunContext(out=str(folder), evaluation=study.settings["evaluation"], eval_sets=study.eval_sets,
                         device=str(study.settings["device"]), dtype=str(study.settings["dtype"]),
                         progress=progress and inline, threads=None if inline else core_share(workers),
                         log=not inline)
    if todo:
        executor = make_executor(executor_kind, context, workers, address)
        try:
            _schedule(todo, done, executor, database, outcome, echo, inline)
        finally:
            executor.close()
    if study.settings["evaluation"]["latency"]:
        if retime:
            echo(f"--retime-latency: {forget_timings(database, context)} earlier timing(s) dropped")
        outcome.timed = time_runs(database, context, echo)
    if not study.settings["keep_models"]:
        _remove_models(study, database, folder)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _schedule(todo: list[Run], done: set[str], executor: Any, database: ResultsDatabase, outcome: StudyOutcome,
              echo: Callable[[str], None], inline: bool) -> None:
    """Submit runs as their parents finish; commit each finished run's row; log failures."""
    pending = list(todo)
    running: dict[str, Run] = {}
    failed: set[str] = set()
    total = outcome.total
    while pending or running:
        for run in [r for r in pending if r.parent is None or r.parent in done]:
            if len(running) >= executor.capacity:
                break
            pending.remove(run)
            running[run.key] = run
            position = outcome.done_before + len(outcome.finished) + len(outcome.failed) + len(running)
            echo(f"[run {position}/{total}] {run.label}" + ("" if inline else " (started in a worker; output in "
                                                                                 "logs/)"))
            executor.submit(run)
        if not running:
            break  # what is left waits for a run that failed
        for result in executor.wait():
            run = running.pop(result.key)
            _finish(run, result, database, done, failed, outcome, echo, total)
        for run in [r for r in pending if r.parent in failed]:
            pending.remove(run)
            failed.add(run.key)
            outcome.blocked.append(run.label)
            echo(f"  skipped {run.label}: the run it fine-tunes failed")


def _finish(run: Run, result: RunOutcome, database: ResultsDatabase, done: set[str], failed: set[str],
            outcome: StudyOutcome, echo: Callable[[str], None], total: int) -> None:
    if result.ok:
        database.add_run(run, result.results, result.seconds, result.machine, result.versions)
        done.add(run.key)
        outcome.finished.append(run.label)
        echo(f"  done {run.label} in {result.seconds:.1f} s ({outcome.done_before + len(outcome.finished)}/{total} "
             "runs done): "
             f"{summary(result.results)}")
    else:
        database.add_failure(run.key, run.label, result.error)
        failed.add(run.key)
        outcome.failed.append((run.label, result.error))
        echo(f"  failed {run.label}: {result.error}")


def summary(results: dict[str, Any]) -> str:
    """'austen/eval perplexity 65.14, 44.2% sparse' from a run's results."""
    parts = []
    for label, quality in (results.get("quality") or {}).items():
        value = quality.get("value")
        if isinstance(value, float):
            shown = f"{value:.2f}" if quality["metric"] == "perplexity" else f"{100 * value:.2f}%"
            parts.append(f"{label} {quality['metric']} {shown}")
    size = results.get("size") or {}
    if isinstance(size.get("total_params"), int):
        parts.append(f"{size['total_params'] / 1e6:.1f} M params, {100 * size.get('prunable_sparsity', 0):.1f}% "
                     "of block weights zero")
    return ", ".join(parts) or "measured"


def _remove_models(study: Study, database: ResultsDatabase, folder: Path) -> None:
    """keep_models: false: remove model folders once their run is measured and timed and nothing depends on them."""
    done, timed = database.done_keys(), database.timed_keys()
    waiting = {run.parent for run in study.runs if run.parent and run.key not in done}
    for run in study.runs:
        if run.folder and run.key in done and run.key in timed and run.key not in waiting:
            target = folder / run.folder
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
    with contextlib.suppress(OSError):
        if (folder / "models").is_dir() and not os.listdir(folder / "models"):
            (folder / "models").rmdir()
