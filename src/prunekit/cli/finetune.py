"""`prunekit finetune PRUNED_DIR --data austen [--lora] [--distill] --out DIR`: recover a pruned model.

Every zero of the pruned model stays zero: full fine-tuning zeroes the gradients of pruned weights
and re-applies the mask after each step; LoRA adapters are merged back and the result re-masked.
``--distill`` adds a KL loss towards the dense model (the record's source model, or ``--teacher``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from prunekit.cli.common import (
    TRAIN_DEFAULTS,
    add_common,
    add_training_flags,
    maybe_print_config,
    print_outcome,
    resolve,
)
from prunekit.errors import PrunekitError

DEFAULTS: dict[str, Any] = {
    "model": None, "data": None, "lora": False, "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
    "distill": False, "teacher": None, "temperature": 2.0, "distill_alpha": 0.5, "max_tokens": None,
    **TRAIN_DEFAULTS, "lr": None, "batch_size": 8,
}


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
    from prunekit.jobs import finetune_job

    job = finetune_job(settings, record)
    print_outcome(job, settings, f"recovery of {settings['model']}")
    return 0


