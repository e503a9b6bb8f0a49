"""The lm-evaluation-harness bridge: run lm-eval tasks on a model already in memory, with the harness's metrics.

The model and tokenizer are wrapped in ``lm_eval.models.huggingface.HFLM`` (no re-save, no reload) and
``lm_eval.simple_evaluate`` runs the tasks, so the numbers are lm-eval's own (acc, acc_norm, their
standard errors...). prunekit's offline tasks (``austen-cloze``, ``austen-nextsent``,
``reviews-zeroshot``) are lm-eval task definitions in :data:`TASK_DIR`; lm-eval's own tasks (arc_easy,
hellaswag, ...) download their data from the Hugging Face hub and fail with a one-line error when it
cannot be reached. lm-eval is optional (``pip install 'prunekit[eval]'``) and imported only here.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.evaluate.zeroshot import TASKS

TASK_DIR = Path(__file__).with_name("tasks")
INSTALL_HINT = "pip install 'prunekit[eval]'"
OFFLINE_HINT = f"prunekit's offline tasks work without it: {', '.join(TASKS)}"


def parse_tasks(value: str | Sequence[str] | None) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'] (order kept, duplicates and blanks dropped)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        for name in str(item).split(","):
            if name.strip() and name.strip() not in names:
                names.append(name.strip())
    return names


def lm_eval_version() -> str:
    """The installed lm-eval's version, or a one-line error naming the install command."""
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise PrunekitError(f"--tasks needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from exc
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - installed without metadata
        return "unknown"


@contextlib.contextmanager
def _kept_random_state() -> Iterator[None]:
    """lm-eval seeds Python, NumPy and torch globally: give the caller its random state back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """lm-eval logs a warning per task and per in-memory model: keep only its errors on the terminal."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# the lm-eval modules that make progress bars (documents, tokenizing, requests), each with its own `tqdm` name
_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _lm_eval_bars(progress: bool) -> Iterator[None]:
    """lm-eval's progress bars, or none: its calls pass ``disable=`` themselves, so TQDM_DISABLE cannot hide them."""
    if progress:
        yield
        return
    import importlib

    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        return tqdm(*args, **{**kwargs, "disable": True})

    with contextlib.ExitStack() as stack:
        for name in _BAR_MODULES:
            module = importlib.import_module(name)
            if hasattr(module, "tqdm"):
                stack.enter_context(mock.patch.object(module, "tqdm", silent))
        yield


@functools.lru_cache(maxsize=2)
def _indexed_tasks(include_defaults: bool) -> Any:
    """lm-eval's TaskManager over prunekit's task folder (and lm-eval's own tasks): built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=include_defaults)


def _task_manager(names: list[str]) -> Any:
    own = all(name in TASKS for name in names)  # indexing lm-eval's ~14,000 task files takes seconds: skip it
    manager = _indexed_tasks(not own)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise PrunekitError(f"unknown lm-eval task {', '.join(unknown)}: prunekit's offline tasks are "
                            f"{', '.join(TASKS)}; `lm_eval ls tasks` lists lm-eval's")
    return manager


def _is_unreachable(exc: BaseException) -> bool:
    """True for the errors datasets and huggingface_hub raise when the hub cannot be reached."""
    seen: BaseException | None = exc
    while seen is not None:
        kind = type(seen)
        if isinstance(seen, (ConnectionError, TimeoutError)) or kind.__module__.startswith(
                ("huggingface_hub", "requests", "urllib3", "httpx", "datasets")) or "offline" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_tasks(model: nn.Module, tokenizer: Any, tasks: str | Sequence[str], *, num_fewshot: int | None = None,
              limit: int | float | None = None, batch_size: int = 8, max_length: int | None = None,
              seed: int = 0, quiet: bool = True, progress: bool = True) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the model in memory; the record of :func:`summarize` plus lm-eval's raw results.

    ``num_fewshot`` None keeps each task's own default (0 for prunekit's tasks); ``limit`` caps the
    documents per task (lm-eval's ``--limit``: a count, or a fraction below 1); ``batch_size``: requests
    per forward (8 runs short requests several times faster than 1 and changes no score beyond float
    rounding); ``max_length`` None lets lm-eval take the model's position limit; ``progress`` False
    hides lm-eval's own progress bars. The caller's random state is left as it was.
    """
    names = parse_tasks(tasks)
    if not names:
        raise PrunekitError(f"no task given: pass --tasks NAME[,NAME...] (offline: {', '.join(TASKS)})")
    if batch_size < 1:
        raise PrunekitError(f"batch size {batch_size} must be at least 1: use --batch-size 1 or more")
    if limit is not None and limit <= 0:
        raise PrunekitError(f"--limit {limit} must be positive: give a number of documents, or leave it out")
    if num_fewshot is not None and num_fewshot < 0:
        raise PrunekitError(f"--num-fewshot {num_fewshot} must be 0 or more")
    version = lm_eval_version()
    from transformers import PreTrainedModel

    from prunekit.adapters.heads import model_head

    if not isinstance(model, PreTrainedModel) or model_head(model) != "causal-lm":
        raise PrunekitError("lm-eval tasks need a causal language model (a transformers model with a language-"
                            "modelling head): evaluate a classifier with --data NAME instead")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    # lm-eval records `git describe` of the current directory (not prunekit's, not the model's) and lets git
    # print "fatal: not a git repository" outside one: the record does not keep it, so it is not asked
    no_git = mock.patch("lm_eval.evaluator.get_git_commit_hash", return_value=None)
    with _quiet_lm_eval(quiet), _kept_random_state(), no_git, _lm_eval_bars(progress):
        manager = _task_manager(names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                  max_length=max_length)
        try:
            raw = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
                                          task_manager=manager, log_samples=False, random_seed=seed,
                                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        except PrunekitError:
            raise
        except Exception as exc:
            if not _is_unreachable(exc):
                raise
            first = " ".join(str(exc).split())[:200]
            raise PrunekitError(f"lm-eval could not download the data of {', '.join(names)} from the Hugging Face "
                                f"hub ({type(exc).__name__}: {first}): run where the hub is reachable; "
                                f"{OFFLINE_HINT}") from exc
    if raw is None:  # pragma: no cover - only on a non-zero rank of a distributed run
        raise PrunekitError("lm-eval returned no results (not the main process)")
    return summarize(raw, version=version, num_fewshot=num_fewshot, limit=limit, batch_size=batch_size)


def _metrics(task_result: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's 'acc,none' / 'acc_stderr,none' keys as 'acc' / 'acc_stderr' (a filter other than none is kept)."""
    out: dict[str, Any] = {}
    for key, value in task_result.items():
        if "," not in key:
            continue
        metric, _, filter_name = key.partition(",")
        name = metric if filter_name == "none" else key
        out[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    return out


def summarize(raw: dict[str, Any], *, version: str, num_fewshot: int | None, limit: int | float | None,
              batch_size: int) -> dict[str, Any]:
    """The JSON-ready record of an lm-eval run: per task its metrics, documents, task version and shots."""
    tasks: dict[str, Any] = {}
    for name, result in raw.get("results", {}).items():
        samples = raw.get("n-samples", {}).get(name, {})
        entry: dict[str, Any] = {
            "metrics": _metrics(result), "n_samples": samples.get("effective"), "n_documents": samples.get("original"),
            "version": raw.get("versions", {}).get(name), "num_fewshot": raw.get("n-shot", {}).get(name),
            "higher_is_better": raw.get("higher_is_better", {}).get(name)}
        if name in TASKS:
            entry["chance"] = TASKS[name].chance
        tasks[name] = entry
    return {"harness": "lm-evaluation-harness", "lm_eval_version": raw.get("lm_eval_version") or version,
            "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size, "max_length": raw.get("max_length"),
            "task_folder": str(TASK_DIR), "tasks": tasks}


def protocol(summary: dict[str, Any]) -> str:
    """One sentence: what ran, under which harness version and settings."""
    shots = summary.get("num_fewshot")
    limit = summary.get("limit")
    return (f"lm-evaluation-harness {summary['lm_eval_version']} on the model in memory (HFLM, batch "
            f"{summary['batch_size']}, max length {summary.get('max_length')}), "
            + ("each task's own number of shots" if shots is None else f"{shots}-shot")
            + (f", first {limit} documents per task" if limit is not None else ", all documents")
            + f"; acc ± standard error as lm-eval computes them; prunekit's tasks from {summary['task_folder']}")


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, float) else "-"


def task_rows(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for ``format_table``: one per task and accuracy-like metric, one column per model.

    ``summaries``: model label -> :func:`summarize` record. Values read 'acc ± stderr' in percent.
    """
    order: list[tuple[str, str]] = []
    for summary in summaries.values():
        for task, entry in summary["tasks"].items():
            for metric in entry["metrics"]:
                if not metric.endswith("_stderr") and (task, metric) not in order:
                    order.append((task, metric))
    rows: list[dict[str, Any]] = []
    for task, metric in order:
        row: dict[str, Any] = {"task": task, "metric": metric}
        for label, summary in summaries.items():
            metrics = summary["tasks"].get(task, {}).get("metrics", {})
            value, error = metrics.get(metric), metrics.get(f"{metric}_stderr")
            if metric.startswith("acc"):
                row[label] = f"{_percent(value)} ± {_percent(error)} %" if isinstance(error, float) else \
                    f"{_percent(value)} %"
            else:
                row[label] = f"{value:,.2f}" if isinstance(value, float) else "-"
        chance = TASKS[task].chance if task in TASKS and metric.startswith("acc") else None
        row["chance"] = f"{100 * chance:.0f} %" if chance is not None else "-"
        rows.append(row)
    return rows
