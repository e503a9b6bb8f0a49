"""One run of a study, as a worker executes it: make the model (prune, train or recover), then measure it.

Models are made by the library's jobs (:func:`prunekit.jobs.prune_job`, ``train_job``, ``finetune_job``),
which write the model folder atomically (a temporary folder renamed when complete). A folder that is
already there is complete, so a run interrupted after it was written is measured without redoing the
work; fine-tuning resumes from its newest checkpoint. Every run is then measured the same way: quality
on each evaluation set, parameters and nonzeros, bytes on disk (saved and, optionally, in compressed
formats), zero-shot tasks when asked. Latency is not measured here: it is timed later, in a phase of its
own (:mod:`prunekit.study.latency`), when no other run is active.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.study.spec import EvalSet, Run


@dataclass(frozen=True)
class RunContext:
    """What every run of a study shares: the study folder and how runs are evaluated."""

    out: str  # the study folder (absolute)
    evaluation: dict[str, Any]
    eval_sets: dict[str, list[EvalSet]]  # model -> its evaluation sets
    device: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    threads: int | None = None  # torch threads of a worker process (None: leave as is)
    log: bool = False  # write the run's output to logs/<run>.log instead of the terminal


@dataclass
class RunOutcome:
    """What a worker sends back: the run's results, or the one-line error that stopped it."""

    key: str
    ok: bool
    results: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    machine: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def machine_info() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model, cores, torch threads, memory, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "memory_gib": memory,
            "gpu": gpu, "system": platform.platform(terse=True)}


def execute(run: Run, context: RunContext, note: Callable[[str], None] | None = None) -> RunOutcome:
    """Make and measure one run; errors come back in the outcome (KeyboardInterrupt and kills do not)."""
    from prunekit.record import versions

    if context.threads:
        import torch

        torch.set_num_threads(context.threads)
    started = time.perf_counter()
    log = Path(context.out) / "logs" / f"{Path(run.folder or run.key).name}.log" if context.log else None
    try:
        with _output_to(log):
            say = note or (lambda stage: print(f"  {stage}", flush=True))
            folder = make_model(run, context, say)
            results = measure(run, folder, context, say)
        return RunOutcome(run.key, True, results, time.perf_counter() - started, machine_info(), versions())
    except PrunekitError as exc:
        return RunOutcome(run.key, False, seconds=time.perf_counter() - started, error=" ".join(str(exc).split()))
    except Exception as exc:  # a run that breaks must not stop the study: it is logged and tried again next time
        if log is not None:
            with contextlib.suppress(OSError), log.open("a") as handle:
                traceback.print_exc(file=handle)
        first = " ".join(str(exc).split())[:300]
        return RunOutcome(run.key, False, seconds=time.perf_counter() - started,
                          error=f"{type(exc).__name__}: {first}" + (f" (traceback in {log})" if log else ""))


@contextlib.contextmanager
def _output_to(log: Path | None) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors too: progress bars, warnings) to ``log``."""
    if log is None:
        yield
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


# ---- making the model -------------------------------------------------------------------------------------------
def make_model(run: Run, context: RunContext, say: Callable[[str], None]) -> Path | None:
    """The run's model folder (made unless already complete), or None for the dense model read from its source."""
    if run.folder is None:
        return None
    folder = Path(context.out) / run.folder
    if folder.is_dir():
        say(f"model already complete in {run.folder}: measuring it")
        return folder
    if run.kind == "dense":
        say("saving the dense model (it is fine-tuned as a control)")
        _save_dense(run, folder, context)
    elif run.kind in ("one-shot", "structured"):
        say(f"pruning with {run.method}")
        _prune(run, folder, context)
    elif run.kind == "training":
        say(f"training with {run.method}")
        _train(run, folder, context)
    elif run.kind == "recovery":
        say(f"fine-tuning ({run.settings['recovery']['mode']}, {run.settings['recovery']['tokens']:,} tokens)")
        _recover(run, folder, context)
    else:  # pragma: no cover - the grid makes no other kind
        raise PrunekitError(f"unknown run kind '{run.kind}'")
    return folder


def _save_dense(run: Run, folder: Path, context: RunContext) -> None:
    from prunekit.export import save_model
    from prunekit.models import load_model

    model, tokenizer = load_model(run.model, task=run.task, device="cpu", dtype=context.dtype)
    save_model(model, tokenizer, folder, {"kind": "dense", "method": None, "task": run.task,
                                          "source_model": run.model})


def _prune(run: Run, folder: Path, context: RunContext) -> None:
    from prunekit.jobs import prune_job
    from prunekit.methods import get_method

    spec = get_method(run.method)
    config = spec.make_config(run.settings["config"])
    calibration = run.settings.get("calibration") or {"data": "austen", "samples": 1, "seq_len": 2}
    settings = {"model": run.model, "task": run.task, "calib": calibration["data"],
                "calib_samples": calibration["samples"], "seq_len": calibration["seq_len"], "eval": None,
                "eval_tokens": None, "eval_seq_len": None, "latency": False, "device": context.device,
                "dtype": context.dtype, "seed": int(run.settings.get("seed") or 0), "out": str(folder),
                "overwrite": False, "progress": context.progress}
    prune_job(settings, spec, config)


def _training_settings(values: dict[str, Any], run: Run, folder: Path, context: RunContext) -> dict[str, Any]:
    """The settings `prunekit train` / `finetune` would resolve, from the study's training or recovery section."""
    checkpoints = Path(context.out) / "work" / f"{folder.name}.checkpoints"
    return {"epochs": 1.0, "max_steps": None, "max_length": 128, "eval_batch_size": None, "eval_steps": 0,
            "save_steps": None, "max_eval_examples": None, "stop_after": None, "keep_checkpoints": False,
            **values, "out": str(folder), "overwrite": False, "checkpoint_dir": str(checkpoints),
            "resume": checkpoints.is_dir(), "progress": context.progress, "seed": int(run.settings.get("seed") or 0),
            "device": context.device, "dtype": context.dtype}


def _train(run: Run, folder: Path, context: RunContext) -> None:
    from prunekit.jobs import train_job
    from prunekit.methods import get_method

    spec = get_method(run.method)
    config = spec.make_config(run.settings["config"])
    training = dict(run.settings["training"])
    task = training.pop("data")
    settings = _training_settings({**training, "task": task}, run, folder, context)
    settings.update({"model": run.model, "method": run.method})
    job = train_job(settings, spec, config)
    if job.result.stopped_early:  # pragma: no cover - a study never asks to stop early
        raise PrunekitError(f"training of {run.label} stopped early: run the study again to resume it")


def _recover(run: Run, folder: Path, context: RunContext) -> None:
    from prunekit.jobs import finetune_job
    from prunekit.models import read_record

    if not run.parent_folder:  # pragma: no cover - recovery runs always name their parent's folder
        raise PrunekitError(f"recovery run {run.label} names no pruned model")
    source = Path(context.out) / run.parent_folder
    recovery = dict(run.settings["recovery"])
    mode, tokens = recovery.pop("mode"), recovery.pop("tokens")
    recovery.pop("seed", None)
    values = {**recovery, "lora": mode == "lora", "max_tokens": tokens, "teacher": None}
    values.setdefault("lora_rank", 8)
    values.setdefault("lora_alpha", 16)
    values.setdefault("lora_dropout", 0.0)
    settings = _training_settings(values, run, folder, context)
    settings["model"] = str(source)
    finetune_job(settings, read_record(source))


# ---- measuring ----------------------------------------------------------------------------------------------------
def measure(run: Run, folder: Path | None, context: RunContext, say: Callable[[str], None]) -> dict[str, Any]:
    """Quality on every evaluation set, size, bytes on disk (saved and in each asked format), zero-shot tasks."""
    from prunekit.data import load_data
    from prunekit.evaluate import evaluate
    from prunekit.models import load_model, read_record, resolve_model_source

    evaluation = context.evaluation
    source = str(folder) if folder is not None else run.model
    stored = folder if folder is not None else _local_folder(resolve_model_source(run.model, progress=False)[0])
    model, tokenizer = load_model(source, task=run.task, device="cpu", dtype=context.dtype)
    results: dict[str, Any] = {"quality": {}}
    for eval_set in context.eval_sets[run.model]:
        say(f"evaluating on {eval_set.label}")
        measured = evaluate(model, tokenizer, load_data(eval_set.data), seq_len=int(evaluation["seq_len"]),
                            max_tokens=evaluation["tokens"], task=eval_set.metric, split=eval_set.split,
                            path=stored, device=context.device, measure_latency=False, progress=context.progress,
                            batch_size=int(evaluation["batch_size"]), max_length=int(evaluation["max_length"]))
        results["quality"][eval_set.label] = _quality(eval_set, measured)
        results.setdefault("size", measured.get("size"))
        results.setdefault("protocol", measured.get("protocol"))
    size = results.pop("size") or {}
    results["layers"] = {layer["name"]: [layer["params"], layer["nonzero"]] for layer in size.pop("layers", [])}
    results["size"] = size
    results["bytes"] = {"saved": size.get("bytes_on_disk")}
    if evaluation["tasks"]:
        say(f"zero-shot tasks {', '.join(evaluation['tasks'])}")
        from prunekit.evaluate.harness import run_tasks

        results["tasks"] = run_tasks(model, tokenizer, evaluation["tasks"], limit=evaluation["task_limit"],
                                     progress=context.progress)
    del model
    for spec in evaluation["formats"] or []:
        results["bytes"][_format_name(spec)] = _format_bytes(source, spec, Path(context.out), run, say)
    if folder is not None:
        record = read_record(folder)
        results["record"] = {key: record.get(key) for key in ("sparsity", "method_result", "timing", "calibration",
                                                              "recovery", "training", "results", "results_before")
                             if record.get(key) is not None}
        if isinstance(results["record"].get("sparsity"), dict):
            results["record"]["sparsity"].pop("layers", None)  # the measured per-layer counts are kept instead
    return results


def _local_folder(source: str) -> Path | None:
    return Path(source) if Path(source).is_dir() else None


def _quality(eval_set: EvalSet, measured: dict[str, Any]) -> dict[str, Any]:
    if eval_set.metric == "perplexity":
        ppl = measured["perplexity"]
        return {"metric": "perplexity", "value": ppl["perplexity"], "n": ppl["n_tokens"], "protocol": ppl["protocol"]}
    acc = measured["accuracy"]
    return {"metric": "accuracy", "value": acc["accuracy"], "n": acc["n_examples"],
            "protocol": (measured.get("protocol") or {}).get("accuracy")}


def _format_name(spec: dict[str, Any]) -> str:
    quantize = spec.get("quantize", "none")
    return f"{spec.get('format', 'sparse-bitmask')} {spec.get('dtype', 'bfloat16')}" + (
        f" {quantize}" if quantize not in (None, "none") else "")


def _format_bytes(source: str, spec: dict[str, Any], out: Path, run: Run, say: Callable[[str], None]
                  ) -> dict[str, Any]:
    """Bytes of the weight files of the model exported in a compressed format (the export is removed after)."""
    from prunekit.evaluate.size import weight_files
    from prunekit.export import ExportSettings, export_folder

    name = _format_name(spec)
    say(f"measuring bytes as {name}")
    target = out / "work" / f"{Path(run.folder or run.key).name}.{name.replace(' ', '-')}"
    shutil.rmtree(target, ignore_errors=True)
    try:
        export_folder(source, target, ExportSettings(**spec))
        return {"bytes": sum(f.stat().st_size for f in weight_files(target))}
    except PrunekitError as exc:
        return {"bytes": None, "error": " ".join(str(exc).split())}
    finally:
        shutil.rmtree(target, ignore_errors=True)
