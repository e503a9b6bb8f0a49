"""`prunekit finetune PRUNED_DIR --data austen [--lora] [--distill] --out DIR`: recover a pruned model.

Every zero of the pruned model stays zero: full fine-tuning zeroes the gradients of pruned weights
and re-applies the mask after each step; LoRA adapters are merged back and the result re-masked.
``--distill`` adds a KL loss towards the dense model (the record's source model, or ``--teacher``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from prunekit.cli.common import add_common, maybe_print_config, resolve
from prunekit.cli.train import TRAIN_DEFAULTS, add_training_flags
from prunekit.errors import PrunekitError

DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "lora": False, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
    "distill": False, "teacher": None, "temperature": 2.0, "distill_alpha": 0.5, "max_tokens": None,
    **TRAIN_DEFAULTS, "lr": None, "batch_size": 8,
}
SOURCE_KEYS = ("source_model", "source", "base_model", "model")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "finetune", help="recover a pruned model by fine-tuning, keeping every zero",
        description="Fine-tune a model folder written by prunekit (it needs its prunekit.json) on text (causal "
                    "LM blocks of --seq-len tokens) or labelled data, with its masks kept exactly: full "
                    "fine-tuning, or --lora (merged back and re-masked), optionally distilled from the dense model.")
    parser.add_argument("model", nargs="?", default=None, help="a pruned model folder written by prunekit")
    parser.add_argument("--data", default=None, help="austen, text:PATH, wikitext2, reviews, csv:PATH, ...")
    parser.add_argument("--lora", action="store_const", const=True, default=None,
                        help="train LoRA adapters on the prunable layers instead of all weights")
    parser.add_argument("--lora-rank", type=int, default=None, help="LoRA rank r (default 8)")
    parser.add_argument("--lora-alpha", type=int, default=None, help="LoRA scale alpha (default 16)")
    parser.add_argument("--lora-dropout", type=float, default=None, help="LoRA dropout (default 0)")
    parser.add_argument("--distill", action="store_const", const=True, default=None,
                        help="add a KL loss towards the dense model's logits")
    parser.add_argument("--teacher", default=None, help="the dense model (default: the record's source model)")
    parser.add_argument("--temperature", type=float, default=None, help="distillation temperature (default 2)")
    parser.add_argument("--distill-alpha", type=float, default=None,
                        help="weight of the distillation loss; the task loss gets 1 - alpha (default 0.5)")
    parser.add_argument("--max-tokens", default=None,
                        help="causal LM: training-token budget, e.g. 1M or 250k (sets the number of steps)")
    add_training_flags(parser)
    add_common(parser)
    parser.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    from prunekit.export import read_record
    from prunekit.utils import check_output_dir

    settings = resolve(args, DEFAULTS)
    if maybe_print_config(args, settings):
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit finetune PRUNED_DIR --data austen --out DIR")
    if not settings["data"]:
        raise PrunekitError("no dataset given: add --data NAME (austen, text:PATH, reviews, ...)")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    folder = Path(settings["model"])
    if not folder.is_dir():
        raise PrunekitError(f"no model folder at '{folder}': give a folder written by prunekit prune or train")
    record = read_record(folder)  # a folder without its record is refused here
    check_output_dir(settings["out"], bool(settings["overwrite"]))
    if not 0.0 <= float(settings["distill_alpha"]) <= 1.0:
        raise PrunekitError(f"--distill-alpha {settings['distill_alpha']} must lie in [0, 1]")
    if float(settings["temperature"]) <= 0:
        raise PrunekitError(f"--temperature {settings['temperature']} must be positive")
    return finetune_command(settings, record)


def finetune_command(settings: dict[str, Any], record: dict[str, Any]) -> int:
    """Load the pruned model, data and teacher; recover; evaluate; export with an extended record."""
    from prunekit.cli.train import (
        checkpoint_folder,
        final_evaluation,
        finish,
        is_main_process,
        sparsity_record,
        train_config,
        training_record,
    )
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
    data = load_data(settings["data"])
    classification = isinstance(data, ClassificationData)
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
    if result.stopped_early:
        print(f"stopped after {result.steps} of {result.total_steps} steps; the checkpoint is in {checkpoints}: "
              "run the same command with --resume to continue")
        return 0
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
    finish(result, tokenizer, data, settings, new_record, checkpoints, f"recovery of {settings['model']}",
           before=baseline)
    return 0
