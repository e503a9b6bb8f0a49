"""`prunekit train MODEL --task DATA --method mgpp --sparsity 0.9 --out DIR`: prune while fine-tuning.

Classification data (reviews, glue/<task>, csv:PATH with labels) trains a sequence classifier (a
fresh head on an encoder); text data (austen, text:PATH) trains a causal LM on seq_len blocks.
Runs under ``accelerate launch`` too (every process computes the same masks; rank 0 writes).
"""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from prunekit.cli.common import (
    add_common,
    add_method_flags,
    method_defaults,
    parse_method_args,
    printable,
    resolve,
    resolve_method,
)
from prunekit.errors import PrunekitError

KINDS = ("training",)
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1.0, "lr": 5e-5, "batch_size": 32, "eval_batch_size": None, "max_steps": None, "grad_accum": 1,
    "max_length": 128, "seq_len": 256, "weight_decay": 0.0, "lr_warmup": 0.0, "max_grad_norm": 1.0,
    "eval_steps": None, "save_steps": None, "max_eval_examples": None, "eval_max_tokens": 16384,
    "checkpoint_dir": None, "resume": False, "stop_after": None, "keep_checkpoints": False, "out": None,
    "overwrite": False, "progress": True,
}
DEFAULTS: dict[str, Any] = {"model": None, "task": None, "method": "mgpp", **TRAIN_DEFAULTS}


def add_training_flags(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `train` and `finetune`: budget, optimiser, evaluation, checkpoints, output."""
    parser.add_argument("--epochs", type=float, default=None, help="passes over the training split (default 1)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser steps; wins over --epochs")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (linear decay)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples or blocks per step and process")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="batch size of evaluations")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimiser step (default 1)")
    parser.add_argument("--max-length", type=int, default=None, help="classification: tokens per example (128)")
    parser.add_argument("--seq-len", type=int, default=None, help="causal LM: tokens per training block (256)")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    parser.add_argument("--lr-warmup", type=float, default=None, help="fraction of steps warming up the lr (0)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="evaluate every N steps (default: 4 times a run; 0: never)")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint every N steps (default: eval steps)")
    parser.add_argument("--max-eval-examples", type=int, default=None,
                        help="classification: validation examples per evaluation during training (default all)")
    parser.add_argument("--eval-max-tokens", type=int, default=None,
                        help="causal LM: tokens of the eval split, during training and at the end (16384)")
    parser.add_argument("--checkpoint-dir", default=None, help="where checkpoints go (default OUT.checkpoints)")
    parser.add_argument("--resume", action="store_const", const=True, default=None,
                        help="continue from the newest checkpoint in the checkpoint folder")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="stop after N steps with a checkpoint (continue later with --resume)")
    parser.add_argument("--keep-checkpoints", action="store_const", const=True, default=None,
                        help="keep the checkpoint folder after a finished run (default: removed)")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                        help="no progress bars")
    parser.add_argument("--out", default=None, help="output folder for the trained model (required)")
    parser.add_argument("--overwrite", action="store_const", const=True, default=None,
                        help="replace an existing output folder")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train", help="prune while fine-tuning on a task (gmp, movement, mgpp, flop) on a cubic schedule",
        description="Fine-tune MODEL on a task and prune it on the way: the sparsity follows a cubic schedule "
                    "from --initial-sparsity (after --warmup-steps) to --sparsity (at T - --final-steps), masks "
                    "are updated every --update-every steps and enforced after every optimiser step. "
                    "--method none fine-tunes without pruning (the dense baseline). `prunekit methods --kind "
                    "training` lists each method's settings.")
    parser.add_argument("model", nargs="?", default=None, help="minilm-l6, smollm2-135m, a folder or a hub id")
    parser.add_argument("--task", default=None, help="dataset: reviews, glue/<task>, csv:PATH, austen, text:PATH")
    parser.add_argument("--method", default=None, help="gmp, movement, mgpp, flop or none (default mgpp)")
    names = add_method_flags(parser, KINDS)
    parser.set_defaults(method_setting_names=names)
    add_training_flags(parser)
    add_common(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from prunekit.jobs import train_job
    from prunekit.utils import check_output_dir

    names = list(args.method_setting_names)
    settings = resolve(args, {**DEFAULTS, **method_defaults(names)})
    settings["method_args"] = {**(settings.get("method_args") or {}), **parse_method_args(settings.pop("method_arg",
                                                                                                         None))}
    spec, config = resolve_method(settings, names, KINDS)
    if args.print_config:
        print(yaml.safe_dump(printable(settings, names, config), sort_keys=True), end="")
        return 0
    if not settings["model"]:
        raise PrunekitError("no model given: prunekit train MODEL --task DATA --out DIR (MODEL: minilm-l6, a folder)")
    if not settings["task"]:
        raise PrunekitError("no task given: add --task reviews (or glue/sst2, csv:PATH, austen, text:PATH)")
    if not settings["out"]:
        raise PrunekitError("no output folder given: add --out DIR")
    check_output_dir(settings["out"], bool(settings["overwrite"]))
    job = train_job(settings, spec, config)
    print_outcome(job, settings, f"{spec.name} on {settings['task']}")
    return 0


def print_outcome(job: Any, settings: dict[str, Any], title: str) -> None:
    """What a training or recovery job did: a table of the result (and the model before), or how to resume."""
    from prunekit.evaluate import format_table
    from prunekit.jobs import is_main_process

    if not is_main_process():
        return
    result = job.result
    if result.stopped_early:
        print(f"stopped after {result.steps} of {result.total_steps} steps; the checkpoint is in {job.checkpoints}: "
              "run the same command with --resume to continue")
        return
    metrics = ("accuracy", "perplexity")
    rows = []
    if job.before is not None:
        rows.append({"model": f"{settings['model']} (before)", **{k: v for k, v in job.before.items() if k in metrics},
                     "sparsity": job.before.get("sparsity"), "steps": 0, "train_s": 0.0})
    results = job.results or {}
    rows.append({"model": str(settings["out"]), **{k: v for k, v in results.items() if k in metrics},
                 "sparsity": (job.record or {}).get("sparsity", {}).get("total"), "steps": result.steps,
                 "train_s": round(result.train_seconds, 1)})
    if results.get("protocol"):
        print(f"perplexity: {results['protocol']}")
    print(format_table(rows, title=title), end="")
    print(f"saved to {settings['out']}")
