"""Whole jobs as the commands run them: load, (calibrate), prune or train, evaluate, save with a record.

The CLI parses flags and YAML into a settings dict, calls one of these functions and prints what
they return; the Python API can call them the same way. Each job builds its run record
(:class:`prunekit.record.RunRecord`) and writes the model atomically.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.methods.registry import MethodConfig, MethodSpec
from prunekit.record import RunRecord, versions
from prunekit.utils import wants_progress

SOURCE_KEYS = ("source_model", "source", "base_model", "model")


@dataclass
class PruneJob:
    """What :func:`prune_job` did: the record written, the pruning result, evaluations and timing."""

    record: dict[str, Any]
    result: Any  # PruneResult
    out: Path
    evaluation: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)


def prune_job(settings: dict[str, Any], spec: MethodSpec, config: MethodConfig) -> PruneJob:
    """Load, calibrate, prune, (evaluate dense and pruned the same way), save; returns what was done.

    ``settings``: model, task, calib, calib_samples, seq_len, eval, eval_tokens, eval_seq_len, latency,
    device, dtype, seed, out, overwrite (as resolved by ``prunekit prune``); optional: bos, tasks,
    num_fewshot, limit (lm-eval tasks measured on the dense and the pruned model).
    """
    from prunekit.data import TextData, calibration_with_record, load_data
    from prunekit.models import infer_task, load_model
    from prunekit.pruning import prune
    from prunekit.utils import check_output_dir, set_seed

    check_output_dir(settings["out"], bool(settings["overwrite"]))  # before the long work
    export = export_settings(settings, config)
    started = time.perf_counter()
    seed = int(settings["seed"])
    set_seed(seed)
    calib_data = load_data(settings["calib"]) if config.needs_calibration() else None  # bad names fail fast
    if calib_data is not None and not isinstance(calib_data, TextData):
        raise PrunekitError(f"calibration set '{settings['calib']}' holds labelled examples, not text: "
                            "use a text set such as austen, wikitext2 or text:PATH")
    eval_data = load_data(settings["eval"]) if settings["eval"] else None
    measure = eval_data is not None or bool(settings.get("tasks"))
    if settings.get("tasks"):
        from prunekit.evaluate.harness import lm_eval_version

        lm_eval_version()  # a missing lm-eval fails before the long work
    from prunekit.onload_job import onload_plan, prune_onloaded

    # perplexity (--eval on text) is measured onloaded too; lm-eval tasks and accuracy need the whole model
    whole = bool(settings.get("tasks")) or (eval_data is not None and not isinstance(eval_data, TextData))
    plan = onload_plan(settings, spec, config, measure=whole, export=export)
    evaluation: dict[str, Any] = {}
    if plan is not None and eval_data is not None:  # the dense model first: bad eval settings fail before pruning
        dense = _evaluate_onloaded(plan.folder, plan.task, eval_data, settings, path=str(plan.folder))
        if dense is None:  # its parameters do not match the files' tensors (noted): the whole model is loaded
            plan = None
        else:
            evaluation["dense"] = dense
    done = prune_onloaded(settings, spec, config, plan, calib_data, started) if plan is not None else None
    if done is not None:  # sequential onloading: pruned block by block from the files into the output
        record_data, onloaded, out, timing = done
        if evaluation:
            assert plan is not None
            evaluation["pruned"] = _evaluate_pruned_folder(out, plan.task, eval_data, settings)
            if settings["latency"]:
                evaluation["latency"] = _onloaded_latency(settings, spec)
            from prunekit.export import update_record

            record_data = update_record(out, evaluation=evaluation)
        return PruneJob(record_data, onloaded, out, evaluation, {**timing, "total_s": time.perf_counter() - started})
    model, tokenizer = load_model(settings["model"], task=settings["task"], device="cpu", dtype=settings["dtype"])
    if isinstance(eval_data, TextData):
        from prunekit.evaluate.perplexity import check_decoder_only

        check_decoder_only(model)  # before the long work
    if export is not None:
        from prunekit.export import export_layers

        export_layers(model, export, check_zeros=False)  # layer types, int4 groups: before the long work
    loaded = time.perf_counter()
    calibration, calib_record = calibration_with_record(tokenizer, calib_data, settings["calib"],
                                                        int(settings["calib_samples"]), int(settings["seq_len"]), seed)
    if measure and "dense" not in evaluation:
        evaluation["dense"] = _evaluate(model, tokenizer, eval_data, settings, path=_source_folder(settings["model"]))
        model.to("cpu")  # the engine moves one block at a time to the device
    prepared = time.perf_counter()
    result = prune(model, config, calibration, device=settings["device"], progress=wants_progress(settings))
    pruned_at = time.perf_counter()
    if measure:
        model.to("cpu")
        evaluation["pruned"] = _evaluate(model, tokenizer, eval_data, settings)
        if settings["latency"]:
            evaluation["latency"] = _compare_latency(settings, spec, model, tokenizer)
    model.to("cpu")
    timing = {**result.timing, "load_s": loaded - started, "prune_wall_s": pruned_at - prepared}
    record = RunRecord.from_prune(result, task=settings["task"] or infer_task(model.config),
                                  source_model=settings["model"], calibration=calib_record, seed=seed)
    record.timing = timing
    if evaluation:
        record.evaluation = evaluation
    from prunekit.export import export_model, save_model

    if export is None:
        out = save_model(model, tokenizer, settings["out"], record, overwrite=bool(settings["overwrite"]))
    else:
        out = export_model(model, tokenizer, settings["out"], export, record, overwrite=bool(settings["overwrite"]))
    return PruneJob(record.to_dict(), result, out, evaluation, {**timing, "total_s": time.perf_counter() - started})


def export_settings(settings: dict[str, Any], config: MethodConfig | None) -> Any:
    """The compressed export asked for by --export-format (None: a plain folder), checked before any work.

    Without a method config (recovery) the zeros are checked against the format when the model is written."""
    if not settings.get("export_format"):
        return None
    from prunekit.export import ExportSettings

    export = ExportSettings(format=str(settings["export_format"]), dtype=str(settings.get("export_dtype") or
                                                                                 "bfloat16"),
                            quantize=str(settings.get("export_quantize") or "none"))
    if config is not None and export.format == "sparse-24-bitmask" and str(getattr(config, "structure", "")) != "2:4":
        raise PrunekitError("--export-format sparse-24-bitmask needs 2:4 zeros: add --structure 2:4, "
                            "or use --export-format sparse-bitmask")
    return export


def _evaluate(model: Any, tokenizer: Any, data: Any, settings: dict[str, Any], path: str | None = None
              ) -> dict[str, Any]:
    """Quality and size, measured the same way for the dense and the pruned model (latency apart, interleaved).

    A local text file is scored whole, unless it is also the calibration set: then its held-out eval split.
    """
    from prunekit.evaluate import evaluate

    seq_len = int(settings["eval_seq_len"] or settings["seq_len"])
    limit = settings.get("limit")
    return evaluate(model, tokenizer, data, seq_len=seq_len, max_tokens=settings["eval_tokens"], path=path,
                    device=settings["device"], measure_latency=False, progress=wants_progress(settings),
                    split=_eval_split(data, settings),
                    bos=bool(settings.get("bos", True)), tasks=settings.get("tasks"),
                    num_fewshot=settings.get("num_fewshot"), seed=int(settings["seed"]),
                    limit=int(limit) if limit is not None and float(limit) >= 1 else limit)


def _eval_split(data: Any, settings: dict[str, Any]) -> str:
    """A local text file is scored whole, unless it is also the calibration set: then its held-out eval split."""
    from prunekit.data.core import WHOLE_SPLIT

    if data is not None and WHOLE_SPLIT in data.splits and settings["eval"] != settings.get("calib"):
        return WHOLE_SPLIT
    return "eval"


def _evaluate_onloaded(folder: Path, task: str, data: Any, settings: dict[str, Any], path: str | None = None
                       ) -> dict[str, Any] | None:
    """What :func:`_evaluate` measures, with the blocks read from ``folder``'s files one at a time.

    None when the model's parameters do not match the files' tensors (a note says so).
    """
    from prunekit.onload import return_freed_memory
    from prunekit.onload_eval import evaluate_onloaded, load_tokenizer

    return_freed_memory()  # activations freed go back to the OS (see its docstring)
    return evaluate_onloaded(folder, task, load_tokenizer(folder), data, split=_eval_split(data, settings),
                             seq_len=int(settings["eval_seq_len"] or settings["seq_len"]),
                             max_tokens=settings["eval_tokens"], device=settings["device"], dtype=settings["dtype"],
                             progress=wants_progress(settings), bos=bool(settings.get("bos", True)), path=path,
                             mode=str(settings.get("onload") or "auto"))


def _evaluate_pruned_folder(out: Path, task: str, data: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """The onloaded prune's output measured like the dense model: onloaded, or loaded whole where it cannot be."""
    from prunekit.onload_eval import folder_refusal
    from prunekit.onload_job import note

    reason = folder_refusal(out)
    if reason is None:
        result = _evaluate_onloaded(out, task, data, settings)
        if result is not None:
            return result
    else:
        note(f"the pruned model is not evaluated with sequential onloading: {reason}; loading it whole")
    from prunekit.models import load_model

    model, tokenizer = load_model(str(out), task=task, device="cpu", dtype=settings["dtype"], progress=False)
    return _evaluate(model, tokenizer, data, settings)


def _onloaded_latency(settings: dict[str, Any], spec: MethodSpec) -> dict[str, Any]:
    """Latency of an onloaded prune: zeros change no speed; a structured model is not timed (no model in memory)."""
    if spec.kind != "structured":
        return _compare_latency(settings, spec, None, None)  # not measured: the same speed as dense
    from prunekit.onload_job import note

    note("latency is not timed with sequential onloading (no whole model is in memory): prune with --onload never "
         "to time dense against pruned, or pass --no-latency")
    return {"measured": False, "reason": "sequential onloading: no whole model in memory to time"}


def _compare_latency(settings: dict[str, Any], spec: MethodSpec, pruned: Any, tokenizer: Any) -> dict[str, Any]:
    """Dense and pruned latency measured interleaved in one run, or why it was not measured.

    Unstructured and N:M zeros change no shape, so a dense runtime runs the pruned model exactly as fast
    as the dense one: timing it would only measure the machine's load. Structured methods are timed
    against the dense model reloaded from its source, alternating the two.
    """
    if spec.kind != "structured":
        return {"measured": False, "reason": "zeros in dense weights change no matmul: same speed as dense"}
    from prunekit.evaluate.speed import compare_latency
    from prunekit.models import load_model

    dense, _ = load_model(settings["model"], task=settings["task"], device="cpu", dtype=settings["dtype"])
    results = compare_latency({"dense": dense, "pruned": pruned}, device=settings["device"])
    return {"measured": True, **{name: _as_dict(value) for name, value in results.items()}}


def _as_dict(value: Any) -> Any:
    from dataclasses import asdict, is_dataclass

    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def _source_folder(model: str) -> str | None:
    """The local folder the dense model was read from (for its bytes on disk), or None for a hub id."""
    from prunekit.models import resolve_model_source

    source, _builtin = resolve_model_source(model, progress=False)
    return source if Path(source).is_dir() else None


# ---- training and recovery --------------------------------------------------------------------------------------
def train_config(settings: dict[str, Any]) -> Any:
    """A TrainConfig from resolved settings (one-line errors for impossible values)."""
    from prunekit.finetune import TrainConfig

    for key in ("batch_size", "grad_accum", "max_length", "seq_len"):
        if int(settings[key]) < 1:
            raise PrunekitError(f"--{key.replace('_', '-')} {settings[key]} must be at least 1")
    if float(settings["lr"]) <= 0:
        raise PrunekitError(f"--lr {settings['lr']} must be positive")
    if settings["max_steps"] is not None and int(settings["max_steps"]) < 1:
        raise PrunekitError(f"--max-steps {settings['max_steps']} must be at least 1")
    if settings["max_steps"] is None and float(settings["epochs"]) <= 0:
        raise PrunekitError(f"--epochs {settings['epochs']} must be positive")
    return TrainConfig(
        epochs=float(settings["epochs"]), lr=float(settings["lr"]), batch_size=int(settings["batch_size"]),
        eval_batch_size=settings["eval_batch_size"], max_steps=settings["max_steps"],
        grad_accum=int(settings["grad_accum"]), max_length=int(settings["max_length"]),
        seq_len=int(settings["seq_len"]), max_train_tokens=settings.get("max_train_tokens"),
        max_eval_tokens=settings["eval_max_tokens"], max_eval_examples=settings["max_eval_examples"],
        weight_decay=float(settings["weight_decay"]), lr_warmup_ratio=float(settings["lr_warmup"]),
        max_grad_norm=float(settings["max_grad_norm"]), eval_steps=settings["eval_steps"],
        save_steps=settings["save_steps"], seed=int(settings["seed"]), device=str(settings["device"]),
        progress=bool(settings["progress"]), stop_after=settings["stop_after"],
        distill_temperature=float(settings.get("temperature", 2.0)),
        distill_alpha=float(settings.get("distill_alpha", 0.5)))


def checkpoint_folder(settings: dict[str, Any]) -> Path:
    """The checkpoint folder: --checkpoint-dir, or OUT.checkpoints beside the output folder."""
    if settings["checkpoint_dir"]:
        return Path(settings["checkpoint_dir"])
    out = Path(settings["out"])
    return out.with_name(out.name + ".checkpoints")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_everyone() -> None:
    """Barrier across processes (a no-op in a single-process run)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def check_tasks(settings: dict[str, Any], classification: bool, data_name: str) -> None:
    """lm-eval tasks after training: only for a causal LM, and lm-eval must be installed (before the long work)."""
    if not settings.get("tasks"):
        return
    if classification:
        raise PrunekitError(f"--tasks runs lm-evaluation-harness on a causal language model, but '{data_name}' "
                            "trains a classifier: drop --tasks")
    from prunekit.evaluate.harness import lm_eval_version, parse_tasks

    parse_tasks(settings["tasks"])
    lm_eval_version()


def final_evaluation(model: Any, tokenizer: Any, data: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Test accuracy (classification) or eval-split perplexity (causal LM) of the trained model."""
    from prunekit.data import ClassificationData, eval_tokens
    from prunekit.evaluate import accuracy, perplexity

    progress = bool(settings["progress"])
    batch = int(settings["eval_batch_size"] or settings["batch_size"])
    if isinstance(data, ClassificationData):
        split = "test" if data.splits.get("test") else "validation"
        result = accuracy(model, tokenizer, data.splits[split], batch_size=batch,
                          max_length=int(settings["max_length"]), progress=progress, split=split)
        return {"accuracy": result.accuracy, "split": split, "n_examples": result.n_examples}
    tokens = eval_tokens(tokenizer, data, "eval", max_tokens=settings["eval_max_tokens"])
    bos = getattr(tokenizer, "bos_token_id", None) if settings.get("bos", True) else None
    ppl = perplexity(model, tokens, seq_len=int(settings["seq_len"]), progress=progress, bos_token_id=bos)
    results: dict[str, Any] = {"perplexity": ppl.perplexity, "split": "eval", "n_tokens": ppl.n_tokens,
                               "protocol": ppl.protocol}
    if settings.get("tasks"):
        from prunekit.evaluate.harness import protocol, run_tasks

        limit = settings.get("limit")
        results["tasks"] = run_tasks(model, tokenizer, settings["tasks"], num_fewshot=settings.get("num_fewshot"),
                                     limit=int(limit) if limit is not None and float(limit) >= 1 else limit,
                                     seed=int(settings.get("seed", 0)), progress=progress)
        results["tasks_protocol"] = protocol(results["tasks"])
    return results


def training_record(settings: dict[str, Any], result: Any, config: Any) -> dict[str, Any]:
    """The 'training' part of a record: settings, steps, processes, time and the evaluation history."""
    evals = [entry for entry in result.history if any(key.startswith("eval_") for key in entry)]
    return {**config.describe(), "steps": result.steps, "total_steps": result.total_steps, "n_train": result.n_train,
            "world_size": result.world_size, "train_seconds": result.train_seconds, "evaluations": evals,
            **result.extra, "data": settings.get("task") or settings.get("data")}


def sparsity_record(facts: dict[str, Any], target: float | None) -> dict[str, Any]:
    """{'target', 'total', 'layers': {name: sparsity}} as one-shot records have it."""
    layers = facts.get("layers") or {}
    return {"target": target, "total": facts.get("sparsity"),
            "layers": {name: info.get("sparsity") for name, info in layers.items() if isinstance(info, dict)}}


@dataclass
class TrainJob:
    """What a training or recovery job did (None fields when it stopped early for a later --resume)."""

    result: Any  # TrainResult
    checkpoints: Path
    record: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    before: dict[str, Any] | None = None


def finish(job: TrainJob, tokenizer: Any, data: Any, settings: dict[str, Any], record: dict[str, Any]) -> TrainJob:
    """Evaluate, write the model with its record (rank 0 only), remove checkpoints unless kept."""
    from prunekit.export import save_model

    if is_main_process():
        results = final_evaluation(job.result.model, tokenizer, data, settings)
        record["results"] = results
        if job.before is not None:
            record["results_before"] = job.before
        export = export_settings(settings, None)
        if export is None:
            save_model(job.result.model, tokenizer, settings["out"], record, overwrite=bool(settings["overwrite"]))
        else:
            from prunekit.export import export_model

            export_model(job.result.model, tokenizer, settings["out"], export, record,
                         overwrite=bool(settings["overwrite"]))
        if job.checkpoints.exists() and not settings["keep_checkpoints"]:
            shutil.rmtree(job.checkpoints, ignore_errors=True)
        job.record, job.results = record, results
    wait_for_everyone()
    return job


def train_job(settings: dict[str, Any], spec: MethodSpec, config: MethodConfig) -> TrainJob:
    """Load data and model, build the training method from its config, train, evaluate and export."""
    from prunekit.data import ClassificationData, load_data
    from prunekit.finetune import train_model
    from prunekit.models import load_model
    from prunekit.utils import check_output_dir, set_seed

    check_output_dir(settings["out"], bool(settings["overwrite"]))
    export_settings(settings, config)  # a bad --export-format fails before training
    trainer_config = train_config(settings)
    method = spec.build(config, seed=int(settings["seed"]), lr=float(settings["lr"]))
    data = load_data(settings["task"])
    classification = isinstance(data, ClassificationData)
    check_model_task(settings["model"], classification, data.name)
    check_tasks(settings, classification, data.name)
    set_seed(int(settings["seed"]))
    num_labels = len(data.label_names) if isinstance(data, ClassificationData) else 2
    model, tokenizer = load_model(settings["model"], task="classification" if classification else "causal-lm",
                                  num_labels=num_labels, device="cpu", dtype=settings["dtype"])
    head = int(getattr(getattr(model, "config", None), "num_labels", num_labels))
    if classification and head != num_labels:
        raise PrunekitError(f"the model's head has {head} classes but '{data.name}' has "
                            f"{num_labels} labels: use a model with a matching head, or a fresh model")
    checkpoints = checkpoint_folder(settings)
    result = train_model(model, tokenizer, data, method=method, config=trainer_config, checkpoint_dir=checkpoints,
                         resume=bool(settings["resume"]))
    job = TrainJob(result, checkpoints)
    if result.stopped_early:
        return job
    facts = dict(result.facts)
    target = getattr(config, "sparsity", None)
    record = RunRecord(
        method=spec.name, kind=spec.kind, method_settings=facts.pop("method_settings", config.to_dict()),
        task="classification" if classification else "causal-lm", source_model=settings["model"],
        data=settings["task"], sparsity=sparsity_record(facts, float(target) if target is not None else None),
        seed=int(settings["seed"]))
    facts.pop("method", None)
    schedule = facts.pop("schedule", None)
    layers = facts.pop("layers", None)
    for key in ("sparsity", "target_sparsity", "loader"):
        facts.pop(key, None)
    record.method_result = facts
    record.update({"schedule": schedule, "layers": layers, "training": training_record(settings, result,
                                                                                         trainer_config)})
    return finish(job, tokenizer, data, settings, record.to_dict())


def check_model_task(model: str, classification: bool, data_name: str) -> None:
    """Refuse text data for an encoder-only model, before loading its weights."""
    from transformers import AutoConfig

    from prunekit.models import BUILTIN_MODELS, infer_task, resolve_model_source

    if classification:
        return
    if model in BUILTIN_MODELS:
        task = BUILTIN_MODELS[model].task
    else:
        source, _ = resolve_model_source(model, progress=False)
        try:
            task = infer_task(AutoConfig.from_pretrained(source))
        except (OSError, ValueError):
            return  # load_model will give the precise error
    if task != "causal-lm":
        raise PrunekitError(f"dataset '{data_name}' has no labels, and '{model}' is not a causal language model: "
                            "train an encoder on a labelled set (reviews, glue/sst2, csv:PATH with labels)")


# ---- recovery ---------------------------------------------------------------------------------------------------
def parse_count(value: Any) -> int | None:
    """'1M', '250k', '1e6' or 1000000 -> 1000000 (None stays None)."""
    if value is None:
        return None
    text = str(value).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    if scale != 1:
        text = text[:-1]
    try:
        count = int(float(text) * scale)
    except ValueError as exc:
        raise PrunekitError(f"token budget '{value}' is not a number: write e.g. 1M, 250k or 1000000") from exc
    if count < 1:
        raise PrunekitError(f"token budget '{value}' must be positive")
    return count


def steps_for_tokens(max_tokens: int, settings: dict[str, Any]) -> int:
    """Optimiser steps that consume ``max_tokens`` training tokens (batch x seq_len x grad_accum x processes)."""
    from prunekit.finetune.trainer import world_size

    per_step = int(settings["batch_size"]) * int(settings["seq_len"]) * int(settings["grad_accum"]) * world_size()
    return max(1, math.ceil(max_tokens / per_step))


def teacher_name(settings: dict[str, Any], record: dict[str, Any]) -> str:
    """The dense model to distil from: --teacher, else the source model named in the record."""
    if settings["teacher"]:
        return str(settings["teacher"])
    for key in SOURCE_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value:
            return value
    raise PrunekitError(f"the record of '{settings['model']}' names no source model to distil from: "
                        "pass --teacher MODEL (the dense model)")


def finetune_job(settings: dict[str, Any], record: dict[str, Any]) -> TrainJob:
    """Recover a pruned model (its folder and record): fine-tune keeping every zero, evaluate, export.

    The new record keeps the pruned model's (method, settings, calibration) and adds ``recovery``.
    """
    from prunekit.data import ClassificationData, load_data
    from prunekit.export import load
    from prunekit.finetune import LoraSettings, recover
    from prunekit.finetune.recovery import check_lora_rank, sparsity_facts
    from prunekit.models import load_model
    from prunekit.utils import set_seed

    lora = settings["lora"]
    if settings["lr"] is None:
        settings["lr"] = 2e-4 if lora else 2e-5
    budget = parse_count(settings["max_tokens"])
    if budget is not None:
        settings["max_steps"] = steps_for_tokens(budget, settings)
        settings["max_train_tokens"] = budget
    export_settings(settings, None)  # a bad --export-format fails before training
    data = load_data(settings["data"])
    classification = isinstance(data, ClassificationData)
    check_tasks(settings, classification, data.name)
    set_seed(int(settings["seed"]))
    task = "classification" if classification else "causal-lm"
    model, tokenizer, _ = load(settings["model"], task=task, dtype=settings["dtype"])
    lora_settings = None
    if lora:
        lora_settings = LoraSettings(int(settings["lora_rank"]), int(settings["lora_alpha"]),
                                     float(settings["lora_dropout"]))
        check_lora_rank(model, lora_settings.rank)
    teacher = None
    if settings["distill"]:
        if classification and not settings["teacher"]:
            raise PrunekitError("distilling a classifier needs --teacher: a dense model fine-tuned on this task "
                                "(the record's source model has an untrained head)")
        name = teacher_name(settings, record)
        teacher, _ = load_model(name, task=task, num_labels=int(getattr(model.config, "num_labels", 2) or 2),
                                device="cpu", dtype=settings["dtype"])
    config = train_config(settings)
    if not settings["distill"]:
        config.distill_alpha = 0.0
    checkpoints = checkpoint_folder(settings)
    before = sparsity_facts(model)["sparsity"]
    # the held-out number of the pruned model, measured the same way as the result's (shown side by side)
    baseline = {**final_evaluation(model, tokenizer, data, settings), "sparsity": before} if is_main_process() else None
    result = recover(model, tokenizer, data, config=config, lora=lora_settings, teacher=teacher,
                     checkpoint_dir=checkpoints, resume=bool(settings["resume"]))
    job = TrainJob(result, checkpoints, before=baseline)
    if result.stopped_early:
        return job
    facts = dict(result.facts)
    new_record = {key: value for key, value in record.items() if key not in ("created", "prunekit_version", "results")}
    new_record.update({
        "task": task, "source_model": teacher_name(settings, record) if settings["distill"] else
        next((record[k] for k in SOURCE_KEYS if isinstance(record.get(k), str)), None),
        "pruned_model": str(settings["model"]), "pruned_record": {"results": record.get("results")},
        "recovery": {"mode": "lora" if lora else "full", "lora": vars(lora_settings) if lora_settings else None,
                     "distill": bool(settings["distill"]),
                     "teacher": teacher_name(settings, record) if settings["distill"] else None,
                     "temperature": settings["temperature"] if settings["distill"] else None,
                     "distill_alpha": settings["distill_alpha"] if settings["distill"] else None,
                     "max_tokens": budget, "sparsity_before": before, "sparsity_after": facts.get("sparsity"),
                     "training": training_record(settings, result, config)},
        "sparsity": sparsity_record(facts, (record.get("sparsity") or {}).get("target")
                                    if isinstance(record.get("sparsity"), dict) else None),
    })
    new_record["kind"] = "recovery"
    new_record["versions"] = versions()
    return finish(job, tokenizer, data, settings, new_record)
